"""adaptive-lr demo (the README's main job): its three cases, each with the base optimizer, the
Active version with the paper's rule and the Active version at the defaults."""

import re

import torch

from adaptive_lr import ActiveAdamW, ActiveSGD, benchmark, demo


def test_each_case_compares_the_base_the_paper_rule_and_the_defaults():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name, base, active in (("AdamW", torch.optim.AdamW, ActiveAdamW),
                               ("SGD", torch.optim.SGD, ActiveSGD)):
        plain, paper, defaults = (make(params, 5) for make in demo._optimizers(name, 0.1))
        assert type(plain) is base and type(paper) is active and type(defaults) is active
        assert paper.param_groups[0]["sign_threshold"] == 0.0
        assert defaults.param_groups[0]["sign_threshold"] == 2.0
    sgd, _, active_sgd = (make(params, 5) for make in demo._optimizers("SGD", 0.1))
    assert sgd.param_groups[0]["momentum"] == active_sgd.param_groups[0]["momentum"] == 0.9


def test_demo_prints_one_row_per_case(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "main", lambda argv: print("step-time table"))
    demo.main(["--epochs", "1", "--batch-size", "512"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"(MLP|CNN) (AdamW|SGD), lr", line)]
    assert [row.split(",")[0] for row in rows] == ["MLP AdamW", "CNN AdamW", "CNN SGD"]
    assert all(len(re.findall(r"\d+\.\d+% \(", row)) == 3 for row in rows)
    assert out.rstrip().endswith("step-time table")
