"""Converters from other frameworks' formats into this library's models, one module per source:

- `openflamingo`: OpenFlamingo 2.0.1 state dicts (released `checkpoint.pt` files and full `state_dict()`s);
- `mpt`: MosaicML's remote-code MosaicGPT / MPT language models -> transformers' `MptForCausalLM` (and the QK
  LayerNorm the 3B release needs, which building a model from a converted directory turns on);
- soon IDEFICS and Llama 3.2 Vision checkpoints, each a module of its own.

Nothing is imported here: `build` uses `convert.mpt` while `convert.openflamingo` uses `build`, so a package that
imported its modules would close that into an import cycle (tests/test_model_layout.py checks there is none).
"""
