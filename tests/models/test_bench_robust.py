"""`hmd bench train`'s defence / distillation step ratios: each method against plain training of
its own network (not a timing test: only what is compared with what)."""
from models.bench_robust import STUDENT_NET, TEACHER_NET, robust_step_ratios


def test_ratios_compare_each_method_with_plain_training_of_its_own_network():
    res = robust_step_ratios(batch_size=4, size=16, repeats=1, warmup=0, threads=1, clock="cpu", flops=True)
    assert res["clock"] == "cpu"
    assert res["compared_with"] == {"defence-great+ce": "plain", "distill-great": "plain-cnn5",
                                    "defence-great+ce (fast)": "plain", "distill-great (fast)": "plain-cnn5",
                                    "distill-great (resnet student)": "plain"}
    assert res["networks"]["plain-cnn5"] == STUDENT_NET == {"arch": "cnn5", "width": 32}
    assert res["networks"]["teacher"] == TEACHER_NET
    ms = res["ms_per_step"]
    for name, base in res["compared_with"].items():
        assert res[f"{name}/plain"] == ms[name] / ms[base]
    assert res["targets"] == {"defence-great+ce/plain": 3.1, "distill-great/plain": 3.5}
    assert res["fast_variants"]["defence-great+ce (fast)"] == {"aux_width": 8, "grad_bn": "detached"}
    # the FLOP floor: the paper's defaults do more arithmetic per step than the fast variants, and each
    # method more than plain training of its network
    gf = res["gflop_per_step"]
    for name, base in res["compared_with"].items():
        assert res["flop_ratios"][f"{name}/plain"] == gf[name] / gf[base] > 1.5
    assert gf["distill-great"] > gf["distill-great (fast)"] and gf["defence-great+ce"] > gf["defence-great+ce (fast)"]
