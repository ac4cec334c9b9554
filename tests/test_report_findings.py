"""The report's checks read the numbers they name: a met target ticks, a missed one does not."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def row(fid, precision, recall, accuracy, passes=16):
    return {"fid": fid, "precision": precision, "recall": recall, "class_accuracy": accuracy,
            "forward_passes_per_image": passes}


def metrics(**changes):
    m = {"base_cfg": row(4.6, 0.636, 0.859, 0.55, 32), "base_nocfg": row(6.1, 0.646, 0.870, 0.38),
         "grpo_loofid_nocfg": row(2.5, 0.654, 0.848, 0.62), "grpo_instance_nocfg": row(4.7, 0.714, 0.707, 0.68)}
    for name, values in changes.items():
        m[name] = {**m[name], **values}
    return m


def ticked(lines, start):
    [line] = [line for line in lines if line[6:].startswith(start)]
    return line.startswith("- [x]")


def test_every_check_ticks_when_every_target_is_met(report):
    lines = report.findings(metrics(), {"eval_net_holdout_accuracy": 0.985}, {"fid": 0.08, "images": 450})
    assert len(lines) == 8 and all(line.startswith("- [x]") for line in lines), lines


@pytest.mark.parametrize("changes, check", [
    ({"base_cfg": {"fid": 6.2}}, "guidance matters"),
    ({"base_cfg": {"class_accuracy": 0.37}}, "guidance matters"),
    ({"grpo_loofid_nocfg": {"fid": 4.7}}, "GRPO + LOO-FID"),
    ({"grpo_loofid_nocfg": {"precision": 0.63}}, "its precision"),
    ({"grpo_loofid_nocfg": {"class_accuracy": 0.54}}, "its precision"),
    ({"grpo_loofid_nocfg": {"recall": 0.70}}, "LOO-FID keeps recall"),
    ({"grpo_instance_nocfg": {"recall": 0.86}, "grpo_loofid_nocfg": {"recall": 0.9}}, "the instance-only run"),
    ({"grpo_loofid_nocfg": {"forward_passes_per_image": 32}}, "at half the forward passes"),
])
def test_a_missed_target_reads_as_missed(report, changes, check):
    lines = report.findings(metrics(**changes), {}, {})
    assert not ticked(lines, check)
    assert sum(not line.startswith("- [x]") for line in lines) == 1, lines


def test_guidance_check_names_precision_without_requiring_it(report):
    # the base rows above have precision 0.636 with CFG and 0.646 without: guidance still matters
    [line] = [line for line in report.findings(metrics(), {}, {}) if "guidance matters" in line]
    assert line.startswith("- [x]") and "precision 0.636 vs 0.646" in line
