import pytest
import torch

from squash import load


@pytest.fixture(scope="session")
def digits():
    return load("digits-cnn")


@pytest.fixture(scope="session")
def minilm():
    return load("minilm-l6")


@pytest.fixture
def tiny_bert_dir(tmp_path, minilm):
    """A tiny BERT transformers folder (random weights, minilm's tokenizer), written here."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(tmp_path / "tiny-bert")
    minilm.tokenizer.save_pretrained(tmp_path / "tiny-bert")
    return tmp_path / "tiny-bert"


@pytest.fixture(scope="session")
def minilm_small(tmp_path_factory, minilm):
    """A small two-layer BERT encoder (random weights, minilm's tokenizer) loaded as a squash Model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("small-bert") / "small-bert"
    BertModel(cfg).save_pretrained(folder)
    minilm.tokenizer.save_pretrained(folder)
    return load(folder)
