"""Run under torchrun: one DistillationTrainer run with DDP over gloo (CPU); rank 0 saves the trained weights."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import transformers  # noqa: E402

import test_hf as h  # noqa: E402  (the models, data and arguments of the single-process tests)

out, fused, accum = sys.argv[1], sys.argv[2] == "fused", int(sys.argv[3])

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
tr = h.DistillationTrainer(model=h.student(), teacher=h.teacher(), loss=h.loss_fn(), fused=fused,
                           train_dataset=[{"input_ids": s} for s in h.data()],
                           args=h.args(out, per_device_train_batch_size=4 // (2 * accum),
                                       gradient_accumulation_steps=accum, ddp_backend="gloo"))
assert tr.args.world_size == 2, tr.args.world_size
tr.train()
if tr.args.process_index == 0:
    torch.save({"params": h.params(tr.model), "logs": [x for x in tr.state.log_history if "loss" in x],
                "fused_reason": tr.fused_reason}, os.path.join(out, "result.pt"))
