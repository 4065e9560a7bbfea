import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tiny import make_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(directory)
    return directory
