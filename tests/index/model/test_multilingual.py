"""The Hugging Face text-tower path (what the multilingual xlm-roberta-base-ViT-B-32 config loads), run
offline: a tiny XLM-R config and a tokenizer trained here on the project's own docs, through
resolve_model_spec + ClipEmbedder.load, give the vectors open_clip gives for the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from index.model.embedder import ClipEmbedder
from index.model.spec import ModelSpec, resolve_model_spec, tiny_random_dir

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[3]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's order: ids 0-4
TEXTS = ["a photo of a cat", "ein Hund im Schnee", "猫の写真", "кошка на диване", ""]


def _train_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer trained on the README and the API docs, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [ROOT / "README.md", ROOT / "docs" / "API.md", ROOT / "docs" / "ARCHITECTURE.md"]
    tok.train([str(p) for p in corpus], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=77,
    )
    fast.save_pretrained(str(directory))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-dir model: the tiny vision tower, a 2-layer XLM-R text tower, the trained tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-hf")
    vocab = _train_tokenizer(directory)
    tower = directory / "text_tower"
    transformers.XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ).save_pretrained(str(tower))
    config = json.loads((tiny_random_dir() / "open_clip_config.json").read_text())
    multilingual = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")["text_cfg"]
    config["model_cfg"]["text_cfg"] = {**multilingual, "hf_model_name": str(tower)}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def hf_spec(hf_model_dir: Path) -> ModelSpec:
    return resolve_model_spec(f"local-dir:{hf_model_dir}", "random", device="cpu")


def test_the_hf_text_tower_loads_and_encodes_offline(hf_spec: ModelSpec) -> None:
    embedder = ClipEmbedder.load(hf_spec)
    assert isinstance(embedder._model.text, open_clip.hf_model.HFTextEncoder)
    assert isinstance(embedder._tokenizer, open_clip.tokenizer.HFTokenizer)
    vectors = embedder.encode_texts(TEXTS)
    assert vectors.shape == (len(TEXTS), hf_spec.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(v, 5)) for v in vectors}) == len(TEXTS)  # the tower reads the text


def test_hf_text_vectors_equal_open_clips_own(hf_spec: ModelSpec) -> None:
    embedder = ClipEmbedder.load(hf_spec)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hf_spec.seed)
        model = open_clip.create_model(hf_spec.open_clip_name, load_weights=False, pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(hf_spec.open_clip_name)
    with torch.inference_mode():
        expected = model.eval().encode_text(tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(embedder.encode_texts(TEXTS), expected, atol=1e-5)
