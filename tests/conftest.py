import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
# The builders in tests/helpers/ used to live in test modules: pytest rewrites their asserts as it does a test
# module's, so a failing check there explains itself as before.
pytest.register_assert_rewrite("helpers")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tiny import make_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(directory)
    return directory
