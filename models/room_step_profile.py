"""Where a GREAT step's time goes on the room model, beside an equal step (issue 12, step cost).

``python -m models.room_step_profile`` prints JSON: CPU milliseconds (this process's, which other
processes' load inflates less than wall time) of an equal step and a GREAT step (each the mean of 10
after 3 warm-up steps, width 12, 64x64, batch 16 of rendered rooms, one thread), their ratio, and a
GREAT step split into its parts: the encoder forward with every decoder on its own detached copy of
the shared feature and one backward of the normalised losses (LibMTL's rep_grad: the per-task
gradients at the feature), the encoder backward of the GAL-aligned sum, the auxiliary classifier's
inputs, forward and backward on 3 x 16 gradient tensors, and the auxiliary classifier's and GALs'
Adam steps.
"""
import json
import time

import torch
import torch.nn.functional as F

from models.room_network import RoomNet, RoomNetConfig
from models.registry import create_weighting
from models.room_tasks import RoomTaskData
from models.room_data import load_rooms
from models.weighting import per_task_feature_gradients


def clock() -> float:
    return time.process_time()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = RoomTaskData(load_rooms("rooms:32", "train", 64, 0), "rooms:32")
    x, tg = data.batch(torch.arange(16))
    res = {}
    for name in ("equal", "great"):
        model = RoomNet(RoomNetConfig(width=12)).train()
        m = create_weighting(name, model.tasks)
        m.setup(model, model.encode(x[:1]).shape)
        opt = torch.optim.Adam(list(model.parameters()) + m.main_parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            m.step(model, x, tg)
            opt.step()
        t, n = clock(), 10
        for _ in range(n):
            opt.zero_grad()
            m.step(model, x, tg)
            opt.step()
        res[name] = (clock() - t) / n * 1e3
    # GREAT's parts
    model = RoomNet(RoomNetConfig(width=12)).train()
    m = create_weighting("great", model.tasks)
    m.setup(model, model.encode(x[:1]).shape)
    parts = {"forward + per-task backward (rep_grad)": 0.0, "encoder backward (GAL-aligned)": 0.0,
             "aux inputs": 0.0, "aux classifier forward": 0.0, "aux backward": 0.0, "aux + GAL Adam": 0.0}
    n = 10
    for it in range(n + 3):
        t0 = clock()
        f, losses, grads = per_task_feature_gradients(model, x, tg, m.tasks, lambda t, j: j)
        t1 = clock()
        f.backward(m.gals.align(grads))
        t2 = clock()
        m._zero_own()
        inp, labels = m.aux_inputs(grads, tg)
        t3 = clock()
        logits = m.aux(inp)
        loss = F.cross_entropy(logits, labels)
        t4 = clock()
        loss.backward()
        t5 = clock()
        for o in m._own_optimizers():
            o.step()
        m.gals.clamp_()
        t6 = clock()
        if it >= 3:
            for k, d in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                parts[k] += d * 1e3 / n
    res["great_parts_ms"] = {k: round(v, 2) for k, v in parts.items()}
    res["aux_input_shape"] = list(inp.shape)
    res["great/equal"] = round(res["great"] / res["equal"], 3)
    res["equal"], res["great"] = round(res["equal"], 2), round(res["great"], 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
