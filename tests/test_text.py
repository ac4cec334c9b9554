"""Caption features as LlamaGen makes them (left-padding, mask), the offline stand-in encoder, the feature
file, and prompt sets."""

import json

import numpy as np
import pytest
import torch

from argrpo.prompts import DIGIT_WORDS, PromptSet, digit_prompts, load_prompts, save_prompts
from argrpo.text import (
    PromptFeatures,
    StandInT5,
    TextEncoder,
    caption_tokenizer,
    clean_caption,
    compute_prompt_features,
    left_pad,
    load_prompt_features,
    save_prompt_features,
    stand_in_t5,
    stand_in_text_encoder,
)


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


def test_left_pad_by_hand():
    # two captions of 5 positions: 3 and 1 valid tokens, right-padded as the tokenizer returns them
    features = torch.tensor([[[1.0, 1], [2, 2], [3, 3], [9, 9], [9, 9]],
                             [[4.0, 4], [8, 8], [8, 8], [8, 8], [8, 8]]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    padded, new_mask = left_pad(features, mask)
    expected = torch.tensor([[[0.0, 0], [0, 0], [1, 1], [2, 2], [3, 3]],
                             [[0.0, 0], [0, 0], [0, 0], [0, 0], [4, 4]]])
    assert torch.equal(padded, expected)
    assert torch.equal(new_mask, torch.tensor([[False, False, True, True, True], [False, False, False, False, True]]))
    with pytest.raises(ValueError, match="right-padded"):
        left_pad(features, torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]))


def test_left_pad_equals_llamagens_per_caption_loop():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 10, 4, generator=g)
    counts = torch.tensor([10, 1, 4, 7, 2, 9])
    mask = (torch.arange(10)[None] < counts[:, None]).long()
    # LlamaGen's sampling script: flip the mask, rotate each caption by its valid count, zero the padding
    flipped = torch.flip(mask, dims=[-1])
    valid = [int(m.sum()) for m in mask]
    rotated = torch.stack([torch.cat([f[n:], f[:n]]) for f, n in zip(features, valid, strict=True)])
    reference = rotated * flipped[:, :, None]
    padded, new_mask = left_pad(features, mask)
    assert torch.equal(padded, reference) and torch.equal(new_mask, flipped.bool())


def test_caption_tokenizer_follows_t5_conventions():
    tokenizer = caption_tokenizer(["A thick 3", "a handwritten seven."])
    assert tokenizer.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    batch = tokenizer(["a thick 3", "A zebra"], max_length=6, padding="max_length", truncation=True)
    vocab = tokenizer.get_vocab()
    assert batch["input_ids"][0] == [vocab["a"], vocab["thick"], vocab["3"], 1, 0, 0]  # </s> appended, right-padded
    assert batch["input_ids"][1] == [vocab["a"], 2, 1, 0, 0, 0]  # lower-cased; unknown word -> <unk>
    assert batch["attention_mask"][1] == [1, 1, 1, 0, 0, 0]


def test_stand_in_encoder_gives_left_padded_masked_features():
    prompts = ["a thick 3", "the digit seven, slanted", "a handwritten one"]
    encoder = stand_in_text_encoder(prompts, max_length=8)
    features, mask = encoder.encode(prompts, batch_size=2)
    assert features.shape == (3, 8, 64) and features.dtype == torch.float32 and mask.dtype == torch.bool
    # valid tokens: the words (punctuation split off) and </s>, at the end
    assert mask.sum(1).tolist() == [4, 6, 4]
    assert torch.equal(mask, torch.arange(8)[None] >= 8 - mask.sum(1, keepdim=True))
    assert torch.count_nonzero(features[~mask]) == 0 and torch.all(features[mask].abs().sum(-1) > 0)
    # the same as encoding one prompt at a time with the model and tokenizer directly, then left-padding
    batch = encoder.tokenizer(prompts[1:2], max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state
    expected, expected_mask = left_pad(hidden, batch["attention_mask"])
    torch.testing.assert_close(features[1:2], expected)
    assert torch.equal(mask[1:2], expected_mask)


def test_stand_in_encoder_is_fixed_by_its_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = stand_in_t5(50), stand_in_t5(50)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = stand_in_t5(50, StandInT5(seed=1))
    assert not torch.equal(a.state_dict()["shared.weight"], c.state_dict()["shared.weight"])


def test_truncation_keeps_max_length_tokens():
    prompts = ["one two three four five six seven eight nine ten"]
    encoder = stand_in_text_encoder(prompts, max_length=5)
    _, mask = encoder.encode(prompts)
    assert mask.tolist() == [[True] * 5]


def test_clean_caption_examples():
    assert clean_caption("  A Man, riding a HORSE.Then  stops ") == "a man, riding a horse. then stops"
    assert clean_caption("see https://example.com/x?y=1 and www.foo.org now") == "see and now"
    assert clean_caption("“Quoted” caption") == '"quoted" caption'  # curly quotes unified
    assert clean_caption('"a caption in quotes"') == "a caption in quotes"
    assert clean_caption("a+thick+3") == "a thick 3"  # URL-unquoting turns + into spaces
    assert clean_caption("cats &amp; dogs @someone") == "cats ; dogs"  # entity and handle removed


def test_prompt_feature_file_round_trip(tmp_path):
    prompts = digit_prompts("eval").prompts[:5]
    encoder = stand_in_text_encoder(prompts, max_length=12)
    path = tmp_path / "features" / "eval.npz"
    computed = compute_prompt_features(encoder, prompts, path, dtype="float16")
    assert computed.features.dtype == torch.float16
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"features", "mask", "prompts"}
        assert data["features"].shape == (5, 12, 64) and data["features"].dtype == np.float16
        assert data["mask"].dtype == np.bool_ and list(data["prompts"]) == list(prompts)
    loaded = load_prompt_features(path, prompts)
    assert torch.equal(loaded.features, computed.features) and torch.equal(loaded.mask, computed.mask)
    full, _ = encoder.encode(prompts)
    assert (loaded.features.float() - full).abs().max() < 1e-2  # float16 rounding only
    features, mask = loaded.lookup(torch.tensor([4, 0]), "cpu")
    assert features.dtype == torch.float32 and torch.equal(mask, loaded.mask[[4, 0]])
    with pytest.raises(ValueError, match="first difference at index 1"):
        load_prompt_features(path, [prompts[0], "another prompt", *prompts[2:]])
    save_prompt_features(path, computed, dtype="float32")
    assert load_prompt_features(path).features.dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        load_prompt_features(tmp_path / "absent.npz")


def test_prompt_features_validate_shapes():
    with pytest.raises(ValueError, match="for P=2 prompts"):
        PromptFeatures(torch.zeros(3, 4, 2), torch.ones(3, 4, dtype=torch.bool), ("a", "b"))
    with pytest.raises(ValueError, match="mask must be bool"):
        PromptFeatures(torch.zeros(1, 4, 2), torch.ones(1, 4), ("a",))


def test_text_encoder_from_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="flan-t5-xl"):
        TextEncoder.from_dir(tmp_path / "nowhere")


def test_text_encoder_from_a_local_directory(tmp_path):
    prompts = ["a thick 3", "a small seven"]
    encoder = stand_in_text_encoder(prompts, max_length=8)
    encoder.model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder.from_dir(tmp_path, dtype="float32", max_length=8)
    assert loaded.dim == 64
    assert torch.equal(loaded.encode(prompts)[0], encoder.encode(prompts)[0])


def test_digit_prompts_carry_their_digit():
    train, evaluation = digit_prompts("train"), digit_prompts("eval")
    assert len(train) == 480 and len(evaluation) == 160
    assert not set(train.prompts) & set(evaluation.prompts)
    assert train.prompts[:2] == ("a handwritten zero", "a handwritten 0")
    assert "a thick 3" in train.prompts and "a handwritten seven" in train.prompts
    for prompt, label in zip(train.prompts + evaluation.prompts, train.labels + evaluation.labels, strict=True):
        words = prompt.replace(",", " ").split()
        assert DIGIT_WORDS[label] in words or str(label) in words
    assert torch.equal(train.label_tensor()[:4], torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="split"):
        digit_prompts("test")


def test_prompt_files_load_and_save(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red car\n\n  a blue bird  \n")
    assert load_prompts(text) == PromptSet(("a red car", "a blue bird"))
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "a thick 3", "label": 3}\n\n{"prompt": "a thin one", "label": 1}\n')
    loaded = load_prompts(lines)
    assert loaded == PromptSet(("a thick 3", "a thin one"), (3, 1))
    out = tmp_path / "out" / "saved.jsonl"
    save_prompts(out, loaded)
    assert load_prompts(out) == loaded
    assert json.loads(out.read_text().splitlines()[0]) == {"prompt": "a thick 3", "label": 3}
    unlabelled = tmp_path / "plain.jsonl"
    unlabelled.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(unlabelled).labels is None


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "label": 1}\n\n{"prompt": "b"}\n', r":3: \"label\" must be given on every line or on none"),
    ('{"prompt": "a"}\nnot json\n', ":2: not JSON"),
    ('{"text": "a"}\n', ':1: expected an object with a string "prompt"'),
    ('{"prompt": "a", "label": "3"}\n', ':1: "label" must be an integer'),
    ('{"prompt": "  "}\n', "non-empty strings"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_prompt_file_kinds(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "absent.txt")
    other = tmp_path / "prompts.csv"
    other.write_text("a\n")
    with pytest.raises(ValueError, match=".txt"):
        load_prompts(other)
