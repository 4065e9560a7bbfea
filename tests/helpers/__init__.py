"""What several test modules build the same way, in one place: test modules import from here (by name, from the
topical module) and never from one another (tests/test_model_layout.py checks that).

- model.py: tiny Flamingo configs and models, their batches, packed rows, the device checks
- data.py: images, samples, shards, the data CLI, the converter fixtures, a chat template
- train.py: tiny run configs, the one-thread fixture, metrics, subprocess and torchrun launchers
- eval.py: the eval CLI and the fixtures' task files
- serve.py: serving conversations, engine jobs and what Flamingo.generate answers
- idefics.py: tiny random IDEFICS checkpoints in the Hub's layout (from idefics_reference.py)

tiny.py (tokenizer, tiny LM configs), serving.py (tiny model, a live server) and idefics_reference.py stay where
they are: tools/ and bench/ use them by those paths. conftest.py has pytest rewrite the asserts in here, as it does
in test modules."""
