"""Vision-language judge rewards on a tiny random Qwen2.5-VL built offline: the yes/no mode against a hand
computation from the model's logits, the generate mode's parsing, retries and counted failures."""

import math

import pytest
import torch
from tiny_vlm import tiny_processor, tiny_qwen_vl

from argrpo.rewards import build_reward
from argrpo.rewards.vlm_judge import (
    GENERATE_PROMPTS,
    YES_NO_QUESTIONS,
    VlmJudgeReward,
    judge_images,
    parse_score,
)

PROMPTS = ["a thick 3", "a photo of a seven", "an image of a 3"]


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


@pytest.fixture(scope="module")
def judge_parts():
    processor = tiny_processor()
    return tiny_qwen_vl(processor), processor


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def judge(judge_parts, **kwargs) -> VlmJudgeReward:
    model, processor = judge_parts
    return VlmJudgeReward(model=model, processor=processor, prompts=PROMPTS, dtype="float32", **kwargs)


@pytest.mark.parametrize("answer,score", [
    ('```json\n{\n"description": "a digit",\n"score": 3.5,\n"explanation": "1+1+0+0.5+1"\n}\n```', 3.5),
    ('{"score": 4}', 4.0),
    ('```json\n{\n    "score": 0,\n}\n```', 0.0),  # AR-GRPO's own 0/1 example has a trailing comma
    ('Sure. {"score": 2, "explanation": "ok"} That is all.', 2.0),
    ('{"score": "4.5"}', 4.5),
    ('{"description": "a "broken" quote", "score": 3}', 3.0),  # invalid JSON: the score field is still read
    ('{"score": 7}', 7.0),  # parsed; the reward checks the range
    ('{"score": -1}', -1.0),
    ("It looks good to me.", None),
    ('{"rating": 3}', None),
    ('{"score": "high"}', None),
    ('{"score": true}', None),
    ('{"score": [3]}', None),
    ('{"score": NaN}', None),
    ("", None),
])
def test_parse_score(answer, score):
    assert parse_score(answer) == score


def test_judge_images_are_8_bit_rgb():
    pictures = judge_images(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert pictures[0].mode == "RGB" and pictures[0].size == (2, 2)
    assert pictures[0].getpixel((0, 0)) == (0, 128, 255)


def test_logits_mode_reward_is_p_yes_from_the_answer_position(judge_parts):
    model, processor = judge_parts
    reward = judge(judge_parts, mode="logits", question="Does this image show {prompt} ? Answer yes or no .")
    x, conditions = images(3), torch.tensor([2, 0, 1])
    scores = reward(x, conditions)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    vocab = processor.tokenizer.get_vocab()
    pictures = judge_images(x)
    for i, c in enumerate(conditions.tolist()):
        # one image at a time, the prompt text written out by hand in Qwen's chat layout
        text = (f"<|im_start|>user\nDoes this image show {PROMPTS[c]} ? Answer yes or no ."
                "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
        inputs = processor(text=[text], images=[pictures[i]], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].double()
        yes, no = logits[vocab["Yes"]].item(), logits[vocab["No"]].item()
        expected = math.exp(yes) / (math.exp(yes) + math.exp(no))
        assert abs(scores[i].item() - expected) < 1e-5
    assert reward.stats() == {"failures": 0.0, "failures_total": 0.0, "retries": 0.0}
    # the prompt reaches the question: another condition gives another probability
    assert (reward(x, torch.tensor([0, 1, 2])) - scores).abs().max() > 0


def test_logits_mode_batches_like_single_images(judge_parts):
    reward = judge(judge_parts, mode="logits", judge="faithfulness", batch_size=4)
    x, conditions = images(5, seed=1), torch.tensor([0, 1, 2, 0, 1])
    batched = reward(x, conditions)
    reward.batch_size = 1
    torch.testing.assert_close(reward(x, conditions), batched, atol=1e-5, rtol=0)


def test_answer_tokens_must_be_single_tokens(judge_parts):
    with pytest.raises(ValueError, match="'Yes please' is 2 tokens"):
        judge(judge_parts, mode="logits", yes_token="Yes please")


def scripted(reward: VlmJudgeReward, replies: list[list[str]]) -> list[list[str]]:
    """Replace generation by scripted answers, one list per call; returns the questions each call received."""
    asked = []

    def generate_answers(pictures, texts):
        assert len(pictures) == len(texts)
        asked.append(texts)
        return replies[len(asked) - 1]

    reward.generate_answers = generate_answers
    return asked


def test_generate_mode_parses_retries_and_counts_failures(judge_parts):
    reward = judge(judge_parts, mode="generate", max_attempts=3)
    asked = scripted(reward, [
        ['```json\n{"score": 3.5}\n```', "no idea", '{"score": 7}', '{"score": 0,}'],  # try 1: 2 good
        ['{"score": 5}', "still no idea"],  # try 2: image 1 answers, image 2 fails again
        ['{"score": 9}'],  # try 3: out of range again: image 2 fails for good
    ])
    scores = reward(images(4), torch.tensor([0, 1, 2, 1]))
    assert [len(texts) for texts in asked] == [4, 2, 1]  # only the failures are asked again
    assert asked[1] == [asked[0][1], asked[0][2]] and asked[2] == [asked[0][2]]
    assert scores[[0, 1, 3]].tolist() == [3.5 / 4, 5 / 4, 0.0]
    assert math.isnan(scores[2].item())  # counted and NaN, never a silent 0
    assert reward.last_failures == 1 and reward.failures == 1 and reward.last_retries == 3
    assert reward.last_failed_answers == ['{"score": 9}']
    assert reward.stats() == {"failures": 1.0, "failures_total": 1.0, "retries": 3.0}
    # the question carries each condition's prompt
    assert f'"{PROMPTS[2]}"' in asked[0][2] and asked[0][0].startswith("\nYou are given a text prompt")
    scripted(reward, [["nothing"] * 2, ["nothing"] * 2, ["nothing"] * 2])
    assert torch.isnan(reward(images(2), torch.tensor([0, 0]))).all()
    assert reward.failures == 3 and reward.last_failures == 2


def test_binary_judges_score_on_a_0_to_1_scale(judge_parts):
    reward = judge(judge_parts, judge="fake", max_attempts=1)
    asked = scripted(reward, [['```json\n{\n    "score": 1,\n}\n```', '{"score": 0}', '{"score": 3}']])
    scores = reward(images(3), torch.tensor([0, 1, 2]))
    assert scores[:2].tolist() == [0.25, 0.0] and math.isnan(scores[2].item())  # 3 is off the 0/1 scale
    assert asked[0][0] == GENERATE_PROMPTS["fake"].text  # no prompt in these questions
    assert "AI-generated" in asked[0][0] and "strange feature" in GENERATE_PROMPTS["weird"].text


def test_real_generation_on_the_tiny_model_never_crashes(judge_parts):
    reward = judge(judge_parts, max_attempts=2, max_new_tokens=6, generation_kwargs={"do_sample": False})
    answers = reward.generate_answers(judge_images(images(2)), reward.questions(torch.tensor([0, 1])))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    scores = reward(images(2), torch.tensor([0, 1]))  # a random model writes no JSON: both fail, counted
    assert torch.isnan(scores).all() and reward.last_failures == 2 and reward.last_retries == 2


def test_judge_configuration_errors(judge_parts, tmp_path):
    model, processor = judge_parts
    with pytest.raises(ValueError, match="give the prompts"):
        VlmJudgeReward(model=model, processor=processor, judge="faithfulness")
    VlmJudgeReward(model=model, processor=processor, judge="weird")  # needs no prompts
    with pytest.raises(ValueError, match="mode must be one of generate, logits"):
        VlmJudgeReward(model=model, processor=processor, judge="weird", mode="vote")
    with pytest.raises(ValueError, match="judge must be one of faithfulness, fake, weird"):
        VlmJudgeReward(model=model, processor=processor, judge="beauty")
    with pytest.raises(FileNotFoundError, match="Qwen2.5-VL-3B-Instruct"):
        VlmJudgeReward(str(tmp_path / "nowhere"), judge="weird")
    reward = judge(judge_parts, mode="logits")
    assert reward.question == YES_NO_QUESTIONS["faithfulness"]
    with pytest.raises(ValueError, match="condition id 3 out of range"):
        reward(images(1), torch.tensor([3]))


def test_judge_loads_from_a_local_directory_and_is_registered(judge_parts, tmp_path):
    model, processor = judge_parts
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reward = build_reward("vlm_judge", model_dir=str(tmp_path), prompts=PROMPTS, mode="logits", dtype="float32")
    assert isinstance(reward, VlmJudgeReward)
    x, conditions = images(2), torch.tensor([0, 2])
    reference = judge(judge_parts, mode="logits")
    torch.testing.assert_close(reward(x, conditions), reference(x, conditions), atol=1e-6, rtol=0)
