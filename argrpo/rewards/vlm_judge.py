"""Vision-language judge rewards: a Qwen2.5-VL model (AR-GRPO uses Qwen2.5-VL-3B-Instruct) looks at each image.

The model and its processor come from a local directory through transformers (nothing downloads).
Each image is shown with a question built for its condition ("{prompt}" in the question is replaced
by the condition's prompt). Two modes:

- "generate", AR-GRPO's judges: the question asks for a JSON answer with a "score"; the answer is
  generated, its score parsed (`parse_score`) and checked to lie in [0, max_score]. An answer without
  a usable score is asked again, up to `max_attempts` tries in all (AR-GRPO: 3); reward = score /
  `score_divisor` (AR-GRPO: 4, so a perfect 5 gives 1.25 and the 0/1 "fake" and "weird" judges give
  0 or 0.25). Retries only help when the judge samples: by default it generates with the model's own
  generation config, as AR-GRPO's transformers pipeline does. Questions (`GENERATE_PROMPTS`, AR-GRPO's
  wording kept verbatim): "faithfulness" (prompt faithfulness, completeness, realism, clarity,
  artifacts; 0-5), "fake" (is the image AI-generated; 0/1) and "weird" (any strange feature; 0/1).
- "logits", fast: one batched forward pass on a yes/no question (`YES_NO_QUESTIONS`), no generation;
  reward = p(yes) = softmax over the logits of the `yes_token` and `no_token` at the first answer
  position. It cannot fail to parse.

An image whose judge still has no usable score after every try gets NaN, never a silent 0 (AR-GRPO's
code gives it 0): the GRPO loop counts non-finite rewards and treats them as 0, and the judge counts
them itself in `failures` (running total) and `last_failures` (last call); `stats()` returns both for
logging. A failing model (out of memory, a bad directory) raises as usual.

Images reach the judge as 8-bit RGB (AR-GRPO sends JPEGs; here no lossy round trip). The question is
placed before the image in the user turn, as AR-GRPO's messages do.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

JUDGE_MODES = ("generate", "logits")


@dataclass(frozen=True)
class JudgePrompt:
    text: str  # "{prompt}" is replaced by the condition's prompt
    max_score: float  # the scale the question asks for: a score outside [0, max_score] is no answer


# AR-GRPO's judge prompts, verbatim (wording and spelling included: the judge was run on exactly these)
FAITHFULNESS_PROMPT = '''
You are given a text prompt used to generate image: "{prompt}"
Below is one generated image: <image>
1. Describe the image thoroughly (objects, colors, layout,
etc.), do not be affected by the prompt.
2. Score the generation quality from following aspects:
- Is the object in the generated image satisfying the category according to the prompt? (0-1 score)
- Is the generated image completed without missing parts? (0-1 score)
- Does the content of generated image look real and reasonable? (0-1 score)
- Is the generated image clear, bright and in high quality? (0-1 score)
- Is the generated image free of any noises, defects and artifacts? (0-1 score)

Your response should in a **JSON** format following rules below:
1. The final response should have three keys: "description", "score", "explanation".
2. The total score of the image should be store in "score" key, you may use float numbers for the scores. \
The value of total score should be between 0 and 5.
3. The reasoning and scoring process could be write in "explanation" for you to explain your score.
Following is a exmaple of response:
```json
{
"description": "The image shows a brown dog with one eye and two ears. its mouth is open and the its tongue is \
sticking out.",
"score": 3.5,
"explanation": "The image shows a brown dog matches the prompt 'a photo of a dog' (1 score). The image is complete \
and all part can be seen (1 score). The dog in the photo looks unreal becaues it has only one eye and the eye \
position is not reasonable (0 score). The dog's face is clear but its body and backgroud is blurred (0.5 score). \
The image do not have any noises, defects and artifacts (1 score). So the total score of this image is \
1+1+0+0.5+1=3.5 .'"
}
```
'''

_BINARY_PROMPT = '''<image>
You need to inspect the image carefully and give a score according to the question below:
- {question} If yes, give 0 score, otherwise give 1 score.
The answer should be in a JSON format like below:
```json
{{
    "score": 0,
}}
```
'''

GENERATE_PROMPTS: dict[str, JudgePrompt] = {
    "faithfulness": JudgePrompt(FAITHFULNESS_PROMPT, 5.0),
    "fake": JudgePrompt(_BINARY_PROMPT.format(question="Is the image an AI-generated image?"), 1.0),
    "weird": JudgePrompt(_BINARY_PROMPT.format(question="Is there any strange feature in the image?"), 1.0),
}

# the same three judgements as yes/no questions, phrased so that "yes" is the good answer
YES_NO_QUESTIONS: dict[str, str] = {
    "faithfulness": 'Does this image show "{prompt}", complete, realistic, clear and free of artifacts? '
                    "Answer yes or no.",
    "fake": "Is this image a real photograph rather than an AI-generated image? Answer yes or no.",
    "weird": "Is this image free of any strange features? Answer yes or no.",
}

_FENCED_JSON = re.compile(r"```json\s*\n(.*?)\n?```", re.S)
_OBJECT = re.compile(r"\{.*\}", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SCORE_FIELD = re.compile(r'"score"\s*:\s*"?\s*(-?(?:\d+(?:\.\d*)?|\.\d+))')


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        score = float(value)
    elif isinstance(value, str):
        try:
            score = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return score if math.isfinite(score) else None


def parse_score(answer: str) -> float | None:
    """The "score" of a judge's answer, or None when it has no usable one.

    As AR-GRPO reads answers: the JSON in a ```json fenced block if there is one, else the whole
    answer. AR-GRPO then repairs broken JSON with the json_repair package; here the repairs are, in
    order: the text as it is, its outermost {...} span, that span without trailing commas (AR-GRPO's
    own 0/1 prompts show `"score": 0,`), and last a `"score": <number>` field anywhere in the text.
    A score is a finite number or a numeric string; booleans, lists, objects and text are not.
    Whether it lies on the judge's scale is for the caller to check.
    """
    if not isinstance(answer, str):
        return None
    fenced = _FENCED_JSON.search(answer)
    text = (fenced.group(1) if fenced else answer).strip()
    candidates = [text]
    span = _OBJECT.search(text)
    if span:
        candidates += [span.group(0), _TRAILING_COMMA.sub(r"\1", span.group(0))]
    for candidate in candidates:
        try:
            parsed = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(parsed, dict) and "score" in parsed:
            return _as_score(parsed["score"])
    field = _SCORE_FIELD.search(answer)
    return _as_score(field.group(1)) if field else None


def judge_images(images: torch.Tensor) -> list:
    """Images [N, 3, H, W] in [-1, 1] -> N 8-bit RGB PIL images."""
    from PIL import Image

    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_judge(model_dir: str, dtype: str = "bfloat16"):
    """(model, processor) of the vision-language model saved in the local directory `model_dir`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"judge model directory not found: {model_dir}. Use a local copy of Qwen/Qwen2.5-VL-3B-Instruct "
            "(the model repository on Hugging Face: config, processor and tokenizer files, weights); nothing "
            "is downloaded."
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPES[dtype], local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    return model, processor


class VlmJudgeReward:
    """reward(images [N, 3, H, W] in [-1, 1], conditions [N]) -> judge scores [N] float32 (NaN: judge failed).

    model_dir: local directory of the judge (or pass a built `model` and `processor`).
    prompts: the prompt of each condition id, needed when the question contains "{prompt}".
    judge: "faithfulness", "fake" or "weird" (the built-in question of `mode`); `question` replaces it
        with any text (and `max_score` then sets its scale; default 5).
    mode: "generate" (AR-GRPO: parsed JSON score / score_divisor) or "logits" (p(yes), one forward).
    max_attempts: tries per image in generate mode; generation_kwargs go to `model.generate`
        (default: the model's generation config) with `max_new_tokens`.
    yes_token / no_token: the two answer tokens of logits mode (each must be one token).
    """

    def __init__(
        self,
        model_dir: str | None = None,
        *,
        prompts: Sequence[str] | None = None,
        judge: str = "faithfulness",
        mode: str = "generate",
        question: str | None = None,
        max_score: float | None = None,
        max_attempts: int = 3,
        score_divisor: float = 4.0,
        max_new_tokens: int = 256,
        generation_kwargs: dict[str, Any] | None = None,
        yes_token: str = "Yes",
        no_token: str = "No",
        device: str | torch.device = "cpu",
        dtype: str = "bfloat16",
        batch_size: int = 8,
        model=None,
        processor=None,
    ):
        if mode not in JUDGE_MODES:
            raise ValueError(f"mode must be one of {', '.join(JUDGE_MODES)}, got {mode!r}")
        if question is None and judge not in GENERATE_PROMPTS:
            raise ValueError(f"judge must be one of {', '.join(GENERATE_PROMPTS)} (or give a question), got {judge!r}")
        if max_attempts < 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"max_attempts, batch_size and max_new_tokens must be >= 1, got "
                             f"{max_attempts}, {batch_size}, {max_new_tokens}")
        if score_divisor <= 0:
            raise ValueError(f"score_divisor must be > 0, got {score_divisor}")
        if mode == "generate":
            self.question = question if question is not None else GENERATE_PROMPTS[judge].text
            self.max_score = float(max_score if max_score is not None else
                                   (5.0 if question is not None else GENERATE_PROMPTS[judge].max_score))
        else:
            self.question = question if question is not None else YES_NO_QUESTIONS[judge]
            self.max_score = 1.0
        if "{prompt}" in self.question and not prompts:
            raise ValueError("this judge's question contains {prompt}: give the prompts of the conditions")
        self.prompts = list(prompts) if prompts else None
        if (model is None) != (processor is None):
            raise ValueError("give both model and processor, or neither (and a model_dir)")
        if model is None:
            if not model_dir:
                raise ValueError("give model_dir (a local directory) or a model and processor")
            model, processor = load_judge(model_dir, dtype)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        # prompts end where the answer starts: generation and last-position logits need left padding
        processor.tokenizer.padding_side = "left"
        self.mode, self.judge = mode, judge if question is None else "custom"
        self.max_attempts, self.score_divisor = max_attempts, float(score_divisor)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.generation_kwargs = dict(generation_kwargs or {})
        if mode == "logits":
            self.yes_id, self.no_id = self._single_token(yes_token), self._single_token(no_token)
        self.failures = 0  # images without a usable score after every try, since construction
        self.last_failures = 0
        self.last_retries = 0  # extra tries spent in the last call
        self.last_failed_answers: list[str] = []  # the final answers of the last call's failures

    def _single_token(self, token: str) -> int:
        ids = self.processor.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer token {token!r} is {len(ids)} tokens for this tokenizer; it must be one")
        return ids[0]

    def questions(self, conditions: torch.Tensor) -> list[str]:
        """The question shown with each image: the judge's text with its condition's prompt filled in."""
        if "{prompt}" not in self.question:
            return [self.question] * len(conditions)
        ids = conditions.tolist()
        bad = [i for i in ids if not 0 <= i < len(self.prompts)]
        if bad:
            raise ValueError(f"condition id {bad[0]} out of range [0, {len(self.prompts) - 1}]")
        return [self.question.replace("{prompt}", self.prompts[i]) for i in ids]

    def judge_inputs(self, images: list, texts: list[str]):
        """The processor's batch for PIL `images` and their questions: one user turn each (question, then
        image), then the assistant's turn opens."""
        chats = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}],
                tokenize=False, add_generation_prompt=True,
            )
            for text in texts
        ]
        return self.processor(text=chats, images=images, padding=True, return_tensors="pt").to(self.device)

    @torch.no_grad()
    def generate_answers(self, images: list, texts: list[str]) -> list[str]:
        """The judge's answer to each (image, question), generated in batches."""
        answers = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.judge_inputs(images[start : start + self.batch_size], texts[start : start + self.batch_size])
            out = self.model.generate(**inputs, **{"max_new_tokens": self.max_new_tokens, **self.generation_kwargs})
            new = out[:, inputs["input_ids"].shape[1]:]  # left padding: every answer starts here
            answers += self.processor.batch_decode(new, skip_special_tokens=True)
        return answers

    @torch.no_grad()
    def yes_probability(self, images: list, texts: list[str]) -> torch.Tensor:
        """p(yes) [N] float32 from the logits of the yes and no tokens at the first answer position."""
        probs = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.judge_inputs(images[start : start + self.batch_size], texts[start : start + self.batch_size])
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # [n, V]
            pair = logits[:, [self.yes_id, self.no_id]]  # [n, 2]
            probs.append(pair.softmax(-1)[:, 0])
        return torch.cat(probs).cpu()

    def judge_scores(self, images: list, texts: list[str]) -> torch.Tensor:
        """Parsed scores [N] float64 (NaN where no try gave a score in [0, max_score]), retrying failures."""
        scores = torch.full((len(images),), math.nan, dtype=torch.float64)
        pending = list(range(len(images)))
        answers: dict[int, str] = {}
        self.last_retries = 0
        for attempt in range(self.max_attempts):
            if not pending:
                break
            self.last_retries += len(pending) if attempt else 0
            replies = self.generate_answers([images[i] for i in pending], [texts[i] for i in pending])
            still = []
            for i, answer in zip(pending, replies, strict=True):
                score = parse_score(answer)
                if score is None or not 0.0 <= score <= self.max_score:
                    still.append(i)
                    answers[i] = answer
                else:
                    scores[i] = score
            pending = still
        self.last_failures = len(pending)
        self.failures += len(pending)
        self.last_failed_answers = [answers[i] for i in pending]
        return scores

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or conditions.shape != images.shape[:1]:
            raise ValueError(f"expected images [N, 3, H, W] and conditions [N], got {tuple(images.shape)} and "
                             f"{tuple(conditions.shape)}")
        texts = self.questions(conditions)
        pictures = judge_images(images)
        if self.mode == "logits":
            self.last_failures = self.last_retries = 0
            return self.yes_probability(pictures, texts).float().to(images.device)
        return (self.judge_scores(pictures, texts) / self.score_divisor).float().to(images.device)

    def stats(self) -> dict[str, float]:
        """Counters for logging: failures of the last call, failures since construction, retries of the last call."""
        return {"failures": float(self.last_failures), "failures_total": float(self.failures),
                "retries": float(self.last_retries)}


class FaithfulnessJudgeReward(VlmJudgeReward):
    """`VlmJudgeReward` with AR-GRPO's faithfulness question (registered as vlm_faithfulness)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "judge": "faithfulness"})


class FakeJudgeReward(VlmJudgeReward):
    """`VlmJudgeReward` with AR-GRPO's "is it AI-generated" question (registered as vlm_fake)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "judge": "fake"})


class WeirdJudgeReward(VlmJudgeReward):
    """`VlmJudgeReward` with AR-GRPO's "any strange feature" question (registered as vlm_weird)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "judge": "weird"})
