#!/usr/bin/env bash
# The reference venv for tools/mpt_parity/make_fixtures.py: the OpenFlamingo 2.0.1 peer venv
# (tools/parity/setup_peer.sh) plus MosaicML's MPT code from PyPI. Never a dependency of the library.
#
#   bash tools/mpt_parity/setup_reference.sh     # venv at ${MPT_REF_VENV:-/tmp/mpt-ref-venv}
#
# llm-foundry 0.1.0 is the earliest release on PyPI (MosaicGPT itself never was: it lived in mosaicml/examples and
# in the models' remote code). It goes in with --no-deps: it declares composer, flash-attn, triton and a training
# stack; make_fixtures.py imports only its MPT model files, which need torch, transformers, einops and omegaconf.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MPT_REF_VENV:-/tmp/mpt-ref-venv}"
PEER_VENV="$VENV" bash "$HERE/../parity/setup_peer.sh"
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps \
  llm-foundry==0.1.0 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
echo "setup_reference.sh: $VENV ready"
