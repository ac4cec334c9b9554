"""Two CPU processes (gloo) against one: the GRPO step, the LOO-FID rewards and sharded sampling agree.

The GRPO comparison feeds the same global rollouts to both runs (each process is served its rows), so
that everything downstream of the sampler — label sharding, rewards, all-reduced LOO-FID sums, group
advantages, the averaged gradient, the entropy feedback, the EMA reference, checkpoints — must match.
"""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from argrpo import grpo, samples
from argrpo.classifier import DigitClassifier
from argrpo.config import ConfigError
from argrpo.data import to_uint8
from argrpo.distributed import Dist, all_gather_cat, cleanup, full_state, init_distributed, rank_seed, shard_indices
from argrpo.entropy import EntropyConfig
from argrpo.generator import LlamaGenPolicy, generate_chunks, generate_sharded
from argrpo.gpt import GPT, gpt_config
from argrpo.grpo import GRPOConfig, global_sums, start_run, train_grpo
from argrpo.policy import Rollout
from argrpo.rewards.classifier import ClassifierReward
from argrpo.rewards.loo_fid import LooFidConfig, LooFidReward, feature_sums
from argrpo.samples import write_shard
from argrpo.sampling import SamplingConfig, sample_tokens
from argrpo.vq import VQModel, vq_config

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
GPT_CFG = gpt_config("tiny", vocab_size=64, num_classes=10, block_size=16)  # 4x4 tokens -> 8x8 images
CFG = GRPOConfig(steps=2, batch_classes=4, group_size=3, inner_epochs=2, micro_batch=4, lr=2e-3, kl_beta=0.1,
                 checkpoint_every=1, precision="fp32", sampling=SamplingConfig(cfg_scale=1.5),
                 loo_fid=LooFidConfig(ema_beta=0.5), fid_advantage_weight=2.0,
                 entropy=EntropyConfig(target=0.5))  # near the tiny policy's entropy: the feedback stays unclamped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(rank: int, port: int, worker, args: tuple) -> None:
    """What torchrun would set up for process `rank`, then the worker."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        worker(dist, *args)
    finally:
        cleanup()


def spawn(worker, *args) -> None:
    mp.spawn(entry, args=(free_port(), worker, args), nprocs=WORLD, join=True)


def build(policy_seed: int = 0):
    torch.manual_seed(policy_seed)
    policy = GPT(GPT_CFG)
    torch.nn.init.normal_(policy.output.weight, std=0.5)  # LlamaGen zero-inits it: make the policy non-uniform
    torch.manual_seed(100)  # tokenizer and judge are the same in every process
    vq = VQModel(vq_config("tiny"))
    judge = DigitClassifier(num_classes=10, width=4, feat_dim=8).eval()
    return policy, vq, judge


def global_rollouts(cfg: GRPOConfig) -> list[dict[str, torch.Tensor]]:
    """The rollouts of every step for the whole batch, from the starting policy, labels as the run draws them."""
    policy = build()[0].eval()
    label_rng = torch.Generator().manual_seed(cfg.seed)
    steps = []
    for step in range(cfg.steps):
        labels = torch.randint(10, (cfg.batch_classes,), generator=label_rng).repeat_interleave(cfg.group_size)
        sample = sample_tokens(policy, labels, cfg.sampling, generator=torch.Generator().manual_seed(50 + step))
        steps.append({"labels": labels, "tokens": sample.tokens, "logprobs": sample.logprobs})
    return steps


class Stop(Exception):
    pass


class FixedRollouts:
    """Stands in for `grpo.rollout`: serves each process its rows of the global batch's rollouts."""

    def __init__(self, steps: list[dict[str, torch.Tensor]], stop_at: int | None = None):
        self.steps, self.stop_at = steps, stop_at

    def __call__(self, run, labels, cfg):  # the conditions of a class-conditional policy are its labels
        if run.step == self.stop_at:
            raise Stop  # every process stops at the same point, as a killed job would
        share = shard_indices(cfg.batch_classes, run.dist.rank, run.dist.world_size)
        rows = slice(share.start * cfg.group_size, share.stop * cfg.group_size)
        step = self.steps[run.step]
        assert torch.equal(labels, step["labels"][rows]), "the process's labels are not its share of the batch"
        return Rollout(step["tokens"][rows], step["logprobs"][rows])


def train(out: Path, cfg: GRPOConfig, rollouts: FixedRollouts, dist: Dist | None = None,
          policy_seed: int = 0) -> tuple[dict, LooFidReward, list]:
    policy, vq, judge = build(policy_seed)
    loo_fid = LooFidReward(judge, torch.zeros(8), torch.ones(8), ema_beta=cfg.loo_fid.ema_beta)
    grpo.rollout = rollouts
    logged = []
    policy = train_grpo(LlamaGenPolicy(policy, vq), {"classifier": (ClassifierReward(judge), 1.0)}, loo_fid, cfg,
                        out, log=lambda step, m: logged.append(m), progress=False, dist=dist)
    return full_state(policy.net.state_dict()), loo_fid, logged  # this process's policy (FSDP: gathered)


def grpo_worker(dist: Dist, cfg: GRPOConfig, rollouts: list, out: Path) -> None:
    # different starting weights per process: the run must start every process from rank 0's
    weights, loo_fid, logged = train(out / "run", cfg, FixedRollouts(rollouts), dist, policy_seed=dist.rank)
    # the same run stopped after one step, then resumed from its checkpoint into freshly built models
    try:
        train(out / "resumed", cfg, FixedRollouts(rollouts, stop_at=1), dist, policy_seed=dist.rank)
    except Stop:
        pass
    resumed, _, _ = train(out / "resumed", cfg, FixedRollouts(rollouts), dist, policy_seed=dist.rank)
    torch.save({"weights": weights, "resumed": resumed, "loo_fid": loo_fid.state_dict(), "logged": logged},
               out / f"rank{dist.rank}.pt")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_take_the_step_one_process_takes(tmp_path, monkeypatch, parallel):
    cfg = replace(CFG, parallel=parallel)
    rollouts = global_rollouts(cfg)
    spawn(grpo_worker, cfg, rollouts, tmp_path)
    monkeypatch.setattr(grpo, "rollout", grpo.rollout)  # so that the sampler is put back after train() swaps it
    single, single_loo, single_logged = train(tmp_path / "single", cfg, FixedRollouts(rollouts))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    start = build()[0].state_dict()
    assert min((single[k] - start[k]).abs().max().item() for k in start) > 1e-3  # every tensor moved
    for k, v in single.items():
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), k  # every process, one policy
        torch.testing.assert_close(ranks[0]["weights"][k], v, rtol=0, atol=1e-5, msg=k)
        # the resumed run restored each process's sampler, optimizer, reference, LOO-FID and entropy state
        assert torch.equal(ranks[0]["resumed"][k], ranks[0]["weights"][k]), k
    for rank in ranks:  # the EMA moments saw the global batch on every process
        for key in ("m1", "m2"):
            torch.testing.assert_close(rank["loo_fid"][key], single_loo.state_dict()[key], rtol=1e-12, atol=0)

    # rank 0 logs the global batch: its FIDs, mean rewards and entropy coefficient are the single run's
    assert [m["step"] for m in ranks[0]["logged"]] == [0, 1] and ranks[1]["logged"] == []
    for two, one in zip(ranks[0]["logged"], single_logged, strict=True):
        for key in ("fid/batch", "fid/ema", "reward/composite_mean", "reward/loo_fid_mean", "entropy/coef",
                    "entropy/token", "policy/loss", "policy/kl", "advantage/fid_abs_mean"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert single_logged[1]["entropy/coef"] > 0  # the controller's feedback was part of the comparison

    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["sample_rngs"]) == WORLD
    assert not torch.equal(state["sample_rngs"][0], state["sample_rngs"][1])  # distinct sampler streams
    single_state = torch.load(tmp_path / "single" / "state.pt", weights_only=True)
    for k, v in single_state["reference"].items():
        torch.testing.assert_close(state["reference"][k], v, rtol=0, atol=1e-5, msg=k)
    assert state["optimizer"]["state"].keys() == single_state["optimizer"]["state"].keys()
    # the controller fed on the global batch's entropy (rank 0's own share would move it elsewhere)
    assert state["entropy"]["c"] == pytest.approx(single_state["entropy"]["c"], rel=1e-6)
    assert EntropyConfig().min_coef < state["entropy"]["c"] < EntropyConfig().max_coef
    assert (tmp_path / "run" / "curves.csv").read_text().count("\n") == 3  # header + 2 rows, written once
    saved = torch.load(tmp_path / "run" / "policy.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in ranks[0]["weights"].items())


def loo_fid_worker(dist: Dist, features: list[torch.Tensor], out: Path) -> None:
    loo_fid = LooFidReward(None, torch.zeros(5), torch.ones(5), ema_beta=0.5)
    rewards = []
    for batch in features:  # two steps: the second one scores against the EMA the first one updated
        share = shard_indices(batch.shape[0], dist.rank, dist.world_size)
        local = batch[share.start : share.stop]
        sums = global_sums(feature_sums(local))
        assert sums.n == batch.shape[0]
        rewards.append(all_gather_cat(loo_fid.score(local, sums)))
    if dist.is_main:
        torch.save({"rewards": rewards, "state": loo_fid.state_dict(), "stats": loo_fid.last_stats}, out)


def test_loo_fid_rewards_of_two_processes_are_the_single_process_rewards(tmp_path):
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(11, 5, generator=g, dtype=torch.float64) + k for k in range(2)]  # 6 + 5 per process
    spawn(loo_fid_worker, features, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = LooFidReward(None, torch.zeros(5), torch.ones(5), ema_beta=0.5)
    for batch, rewards in zip(features, two["rewards"], strict=True):
        expected = one.score(batch)
        assert expected.abs().min() > 1e-4  # rewards well above float noise, so the comparison is a real one
        torch.testing.assert_close(rewards, expected, rtol=1e-6, atol=0)
    for key in ("m1", "m2"):
        torch.testing.assert_close(two["state"][key], one.state_dict()[key], rtol=1e-12, atol=0)
    assert two["stats"] == pytest.approx(one.last_stats, rel=1e-12)


SAMPLE_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_distributed import sample_worker
sample_worker(sys.argv[1])
"""


def sample_models():
    torch.manual_seed(0)
    gpt = GPT(GPT_CFG).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    return LlamaGenPolicy(gpt, VQModel(vq_config("tiny")).eval())


SAMPLE_ARGS = dict(conditions=torch.arange(11) % 10, sampling=SamplingConfig(cfg_scale=1.5), batch_size=2, seed=7,
                   progress=False)


def sample_worker(out: str) -> None:
    """Run under torchrun: this process's images, then every process's gathered on rank 0."""
    dist = init_distributed("cpu")
    indices, images = generate_sharded(sample_models(), dist=dist, **SAMPLE_ARGS)
    torch.save({"indices": indices, "count": len(images)}, f"{out}/rank{dist.rank}.pt")
    all_indices, all_images = all_gather_cat(indices), all_gather_cat(images)
    if dist.is_main:
        torch.save({"indices": all_indices, "images": all_images}, f"{out}/gathered.pt")
    # as the sample stage does it: each process writes its chunks as shards, nothing is gathered
    for index, chunk in generate_chunks(sample_models(), dist=dist, **SAMPLE_ARGS):
        write_shard(f"{out}/set", int(index[0]), to_uint8(chunk), SAMPLE_ARGS["conditions"][index].numpy(),
                    SAMPLE_ARGS["conditions"][index].numpy())
    cleanup()


def test_torchrun_sampling_covers_every_image_once(tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                           str(script), str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # 11 images in chunks of 2: chunks 0-2 on rank 0, chunks 3-5 (the last one a single image) on rank 1
    assert [s["indices"].tolist() for s in shards] == [list(range(6)), list(range(6, 11))]
    assert [s["count"] for s in shards] == [6, 5]
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert gathered["indices"].tolist() == list(range(11))
    images = gathered["images"]
    assert images.shape == (11, 3, 8, 8) and images.abs().max() <= 1
    flat = images.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(11) for j in range(i))  # no image twice
    # every image depends on the seed and its index only: one process draws the same 11 images
    indices, alone = generate_sharded(sample_models(), **SAMPLE_ARGS)
    assert indices.tolist() == list(range(11)) and torch.equal(alone, images)
    # the shards both processes wrote tile the set and stream back as the gathered images, in any batch size
    (tmp_path / "set.json").write_text(json.dumps({"num_images": 11}))
    assert [p.name for p in samples.shards(tmp_path / "set", 11)] == [
        f"shard-{2 * c:08d}-{min(2 * c + 2, 11):08d}.npz" for c in range(6)]
    for batch_size in (3, 11, 64):
        streamed = np.concatenate([b["images"] for b in samples.batches(tmp_path / "set", batch_size)])
        assert np.array_equal(streamed, to_uint8(images))


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (3, 4), (0, 3), (7, 1)])
def test_shards_tile_the_range(n, world):
    shards = [shard_indices(n, rank, world) for rank in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # the remainder is spread, one item each


def test_rank_seeds_are_distinct_and_rank_zero_keeps_the_seed():
    assert rank_seed(1234, 0) == 1234
    seeds = {rank_seed(s, r) for s in range(4) for r in range(64)}
    assert len(seeds) == 4 * 64 and all(0 <= s < 2**64 for s in seeds)
    torch.Generator().manual_seed(rank_seed(2**63, 63))  # every seed is one a generator accepts


def test_batch_classes_must_split_evenly_over_processes():
    policy = LlamaGenPolicy(*build()[:2])
    with pytest.raises(ConfigError, match=r"grpo.batch_classes must be divisible by the number of processes "
                                          r"\(2\), got 3"):
        start_run(policy, GRPOConfig(batch_classes=3), Dist(rank=0, world_size=2))


def test_resume_needs_as_many_processes_as_wrote_the_checkpoint(tmp_path, monkeypatch):
    cfg = replace(CFG, steps=1)
    monkeypatch.setattr(grpo, "rollout", grpo.rollout)  # so that the sampler is put back after train() swaps it
    train(tmp_path, cfg, FixedRollouts(global_rollouts(cfg)))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["sample_rngs"] = state["sample_rngs"] * 2  # as if two processes had written it
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(ConfigError, match="holds the sampler streams of 2 process"):
        train(tmp_path, replace(CFG, steps=2), FixedRollouts(global_rollouts(cfg)))
