"""Caption features for text-to-image models, made the way LlamaGen makes them.

A T5 encoder (FLAN-T5-XL at real scale, 2048-d, loaded from a local directory through transformers)
reads each prompt tokenised to `max_length` 120 tokens with padding (the tokenizer appends `</s>`).
LlamaGen then *left*-pads: the valid tokens move to the end of the 120 positions, the positions before
them are zeroed, and the mask is True on the valid tail. The GPT masks the padded positions as keys.

Prompts are cleaned first (lower case, URLs, odd punctuation, spacing after punctuation) as LlamaGen's
T5 wrapper does before tokenising; `clean_caption` documents the part of that cleaning it leaves out.

The embedded default has no FLAN-T5: `stand_in_text_encoder` builds a small T5 encoder of a fixed
configuration with fixed-seed random weights, and a word-level tokenizer over the caption vocabulary
(`caption_tokenizer`). It is a stand-in with FLAN-T5's interface (same tokenisation rules, padding,
`</s>`, left-padding and mask), not a language model: captions that share words get related features,
nothing more. Nothing here downloads.

Features of a prompt set are computed once into an .npz (`compute_prompt_features`):
    features  [P, L, D] float16 or float32   left-padded caption features
    mask      [P, L]    bool                  True on valid (non-padded) caption tokens
    prompts   [P]       str                   the prompts, in condition-id order
"""

from __future__ import annotations

import html
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CAPTION_LENGTH = 120  # LlamaGen's t5_feature_max_len: caption positions of the T2I GPT
FLAN_T5_XL_DIM = 2048
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

# special tokens of the stand-in tokenizer, at T5's ids
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

_URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w.-]+\.(?:com|co|ru|net|org|edu|gov|it)\b[\w/-]*")
_HANDLE = re.compile(r"@[\w\d]+\b")
_CJK = re.compile(r"[\u31c0-\u9fff]+")  # strokes, katakana extensions, enclosed letters, unified ideographs
_DASHES = re.compile(r"[\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030"
                     r"\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d-]+")
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+")
_PUNCT_THEN_WORD = re.compile(r"(\D[,./])\b")  # "a,b" -> "a, b"


def clean_caption(text: str) -> str:
    """LlamaGen's caption cleaning for the cases prompts meet: URL-unquote, lower case, URLs, @handles,
    CJK characters, unified dashes and quotes, HTML entities (and ftfy's mojibake repair when ftfy is
    installed, as it is with open_clip), stray symbols, a space after punctuation, single spaces,
    stray leading/trailing punctuation and surrounding quotes.

    Left out (they matter only for captions scraped from the web): BeautifulSoup's HTML-tag stripping
    and the rules for shop spam, product codes, file names, IP addresses and long numbers.
    """
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = text.replace("<person>", "person")
    text = _URL.sub("", text)
    text = _HANDLE.sub("", text)
    text = _CJK.sub("", text)
    text = _DASHES.sub("-", text)
    text = re.sub(r"[`´«»“”¨]", '"', text)
    text = re.sub(r"[‘’]", "'", text)
    text = re.sub(r"&quot;?|&amp", "", text)
    text = re.sub(r"[\"']{2,}", '"', text)
    text = re.sub(r"\.{2,}", " ", text)
    text = _BAD_PUNCT.sub(" ", text)
    text = re.sub(r"\s+\.\s+", " ", text)
    if len(re.findall(r"[-_]", text)) > 3:  # this-is-a-slug -> words
        text = re.sub(r"[-_]", " ", text)
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    text = re.sub(r"\b\s+:\s+", ": ", text)
    text = _PUNCT_THEN_WORD.sub(r"\1 ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^[\"']([\w\W]+)[\"']$", r"\1", text)
    text = re.sub(r"^['_,\-:;]", "", text)
    text = re.sub(r"['_,\-:+]$", "", text)
    return text.strip()


def left_pad(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's left-padding of right-padded encoder output.

    features [B, L, D] with mask [B, L] (True/1 on the first n_b positions, as a tokenizer pads on the
    right) -> features whose valid n_b rows are the last n_b positions and zeros before them, and the
    mask [B, L] bool, True on those last n_b positions.
    """
    B, L = mask.shape
    valid = mask.bool()
    counts = valid.sum(1)  # [B]
    positions = torch.arange(L, device=mask.device)
    if not torch.equal(valid, positions[None] < counts[:, None]):
        raise ValueError("left_pad expects right-padded masks: valid tokens first, padding after")
    # rotate each row left by its padding: row j of the result is row (j + n_b) mod L of the input
    source = (positions[None] + counts[:, None]) % L  # [B, L]
    rotated = features.gather(1, source[..., None].expand(-1, -1, features.shape[-1]))
    new_mask = positions[None] >= (L - counts)[:, None]
    return rotated * new_mask[..., None].to(rotated.dtype), new_mask


class TextEncoder:
    """Prompts -> LlamaGen caption features: (features [P, L, D] float32, mask [P, L] bool), left-padded.

    `model` is a transformers `T5EncoderModel`, `tokenizer` any transformers tokenizer that pads on the
    right and appends `</s>` (T5's do). `max_length` is the GPT's `cls_token_num`.
    """

    def __init__(self, model, tokenizer, max_length: int = CAPTION_LENGTH, clean: bool = True,
                 device: str | torch.device = "cpu"):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.clean = clean

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                 max_length: int = CAPTION_LENGTH, clean: bool = True) -> TextEncoder:
        """The T5 encoder and tokenizer saved in the local directory `path` (e.g. a copy of
        google/flan-t5-xl from Hugging Face). LlamaGen runs FLAN-T5-XL in bfloat16."""
        from transformers import AutoTokenizer, T5EncoderModel

        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"T5 directory not found: {path}. Use a local copy of google/flan-t5-xl (the model repository "
                "on Hugging Face: config.json, tokenizer files and weights); nothing is downloaded."
            )
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtypes[dtype])
        return cls(model, tokenizer, max_length, clean, device)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 32,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """features [P, max_length, dim] in `dtype` and mask [P, max_length] bool (on CPU), left-padded.

        Each batch is cast to `dtype` as it is made, so a large prompt set is held once, in that dtype.
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = [clean_caption(p) if self.clean else p.lower().strip() for p in prompts]
        features, masks = [], []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start : start + batch_size], max_length=self.max_length,
                                   padding="max_length", truncation=True, add_special_tokens=True,
                                   return_attention_mask=True, return_tensors="pt")
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, L, D]
            padded, padded_mask = left_pad(hidden.float(), mask)
            features.append(padded.to(dtype).cpu())
            masks.append(padded_mask.cpu())
        if not features:
            return (torch.zeros(0, self.max_length, self.dim, dtype=dtype),
                    torch.zeros(0, self.max_length, dtype=torch.bool))
        return torch.cat(features), torch.cat(masks)


def caption_vocabulary(texts: Sequence[str], clean: bool = True) -> list[str]:
    """The sorted word-level vocabulary of `texts` as the stand-in tokenizer splits them."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = set()
    for text in texts:
        text = clean_caption(text) if clean else text.lower().strip()
        words.update(word for word, _ in split.pre_tokenize_str(text))
    return sorted(words)


def caption_tokenizer(texts: Sequence[str], clean: bool = True):
    """An offline word-level tokenizer over the vocabulary of `texts`, with T5's conventions.

    `<pad>` 0, `</s>` 1 (appended to every text), `<unk>` 2, then the words; lower-cased, split on
    whitespace and punctuation. A transformers `PreTrainedTokenizerFast`, so `TextEncoder` uses it like
    FLAN-T5's tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in caption_vocabulary(texts, clean):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="right")


@dataclass(frozen=True)
class StandInT5:
    """The fixed configuration of the stand-in encoder (FLAN-T5's gated-GELU T5 block, shrunk)."""

    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0


def stand_in_t5(vocab_size: int, shape: StandInT5 = StandInT5()):
    """A randomly initialised `T5EncoderModel` of `shape`, the same for the same seed and transformers
    version. The global random state is left untouched."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=shape.d_model, d_kv=shape.d_kv, d_ff=shape.d_ff,
                      num_layers=shape.num_layers, num_heads=shape.num_heads, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                      eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        return T5EncoderModel(config).eval()


def stand_in_text_encoder(texts: Sequence[str], shape: StandInT5 = StandInT5(), max_length: int = CAPTION_LENGTH,
                          device: str | torch.device = "cpu") -> TextEncoder:
    """The embedded default's text encoder: `caption_tokenizer(texts)` and `stand_in_t5` (a stand-in for
    FLAN-T5; see the module docstring). `texts` should hold every prompt it will encode (train and eval),
    or unseen words become `<unk>`."""
    tokenizer = caption_tokenizer(texts)
    return TextEncoder(stand_in_t5(len(tokenizer), shape), tokenizer, max_length, clean=True, device=device)


@dataclass(frozen=True, eq=False)
class PromptFeatures:
    """Cached caption features of a prompt set; row i belongs to condition id i."""

    features: torch.Tensor  # [P, L, D] float16 or float32, left-padded, zero on padding
    mask: torch.Tensor  # [P, L] bool, True on valid caption tokens
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        P = len(self.prompts)
        shape_ok = self.features.ndim == 3 and self.features.shape[0] == P
        if not shape_ok or tuple(self.mask.shape) != (P, self.features.shape[1]):
            raise ValueError(f"prompt features must be [P, L, D] with mask [P, L] for P={P} prompts, got "
                             f"{tuple(self.features.shape)} and {tuple(self.mask.shape)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"prompt feature mask must be bool, got {self.mask.dtype}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def length(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    def lookup(self, ids: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, L, D] (in `dtype`) and mask [N, L] of prompt ids [N], on `device`."""
        rows = ids.to(self.features.device)
        return self.features[rows].to(device=device, dtype=dtype), self.mask[rows].to(device)


def save_prompt_features(path: str | Path, features: PromptFeatures, dtype: str = "float16") -> None:
    """Write `features` to an .npz (features, mask, prompts), atomically."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=features.features.to(FEATURE_DTYPES[dtype]).numpy(), mask=features.mask.numpy(),
             prompts=np.array(features.prompts, dtype=str))
    os.replace(tmp, path)


def load_prompt_features(path: str | Path, prompts: Sequence[str] | None = None) -> PromptFeatures:
    """The features saved by `save_prompt_features`. With `prompts`, they must be the prompts the file was
    computed for, in the same order (a stale file fails here rather than conditioning on wrong captions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt features not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("features", "mask", "prompts") if k not in data.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}; expected prompt features (features, mask, prompts)")
        loaded = PromptFeatures(torch.from_numpy(data["features"]), torch.from_numpy(data["mask"]).bool(),
                                tuple(str(p) for p in data["prompts"]))
    if prompts is not None and tuple(prompts) != loaded.prompts:
        differ = next((i for i, (a, b) in enumerate(zip(prompts, loaded.prompts, strict=False)) if a != b),
                      min(len(prompts), len(loaded.prompts)))
        raise ValueError(f"{path} was computed for other prompts ({len(loaded.prompts)} stored, {len(prompts)} "
                         f"given; first difference at index {differ}); recompute the features")
    return loaded


def compute_prompt_features(encoder: TextEncoder, prompts: Sequence[str], path: str | Path | None = None,
                            dtype: str = "float16", batch_size: int = 32) -> PromptFeatures:
    """Encode `prompts` once (batched) and, with `path`, save them as an .npz in `dtype`.

    Size: P x L x D values, e.g. 30,000 COCO captions at 120 x 2048 take 14.7 GB in float16 (in memory
    and on disk); the embedded digit prompts at 16 x 64 take under 1 MB.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
    # made in the stored precision, so the returned features equal what a later load gives
    features, mask = encoder.encode(list(prompts), batch_size, FEATURE_DTYPES[dtype])
    result = PromptFeatures(features, mask, tuple(prompts))
    if path is not None:
        save_prompt_features(path, result, dtype)
    return result
