import copy

import pytest
import torch
import torch.nn.functional as F

from pyprune.accuracy import build_model, distillation_loss, evaluate, train


def test_training_loss_falls_and_accuracy_beats_chance(small_task, trained_lenet):
    torch.manual_seed(0)
    m = build_model("lenet5")
    losses = train(m, small_task[0], 2, lr=3e-3)
    assert len(losses) == 2 and losses[1] < losses[0] < 2.4
    # chance is 10%; the 4-epoch model of the fixture is far above it
    assert evaluate(trained_lenet, small_task[1]) > 0.8


def test_distillation_loss_limits():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    assert float(distillation_loss(s, s, y, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(s, t, y, alpha=1.0)) > 0
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, y, temperature=0)


def test_distillation_pulls_student_towards_teacher(small_task, trained_lenet):
    torch.manual_seed(0)
    student = build_model("lenet5")
    x = small_task[1].x

    def gap(m):
        with torch.no_grad():
            return float(
                F.kl_div(
                    F.log_softmax(m(x), 1),
                    F.log_softmax(trained_lenet(x), 1),
                    log_target=True,
                    reduction="batchmean",
                )
            )

    before = gap(student)
    train(student, small_task[0], 1, lr=3e-3, teacher=trained_lenet, alpha=1.0)
    assert gap(student) < before


def test_train_rejects_bad_arguments(small_task):
    m = build_model("lenet5")
    with pytest.raises(ValueError, match="epochs"):
        train(m, small_task[0], -1)
    with pytest.raises(ValueError, match="empty"):
        train(m, [], 1)
    with pytest.raises(ValueError, match="empty"):
        evaluate(m, [])
    assert train(copy.deepcopy(m), small_task[0], 0) == []
