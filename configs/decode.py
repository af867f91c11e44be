"""Mental-state decoding on held-out subjects, from scratch or from a pretrained run.

  python -m boldjax.main --config=configs/decode.py:init=runs/csm_gpt --workdir=runs/dec
  python -m boldjax.main --config=configs/decode.py:backbone=csm,train_subjects=2 ...

`init` names a pretrained workdir (its latest checkpoint is grafted in), empty = scratch;
`freeze` trains only the pooler + head; `train_subjects` keeps only that many training
subjects (the few-subject regime of the original's Fig. 5); `pooling` is what the pooler
sees: "cls" (the original) or "mean" over the frames' hidden states.
"""

from boldjax.parcellated_config import base_config


def get_config(arg=None):
  c, arg = base_config(
    "decode", arg, init="", backbone="csm", freeze=False, train_subjects=0, pooling="cls"
  )
  c.name = f"decode_{arg.backbone}"
  c.data.mode = "decode"
  if arg.train_subjects:
    c.data.train_subjects = arg.train_subjects
  c.task.backbone = arg.backbone
  c.task.init_from = arg.init
  c.task.freeze = arg.freeze
  c.model.decode_pooling = arg.pooling
  c.total_steps = 300 if not arg.runlocal else 6
  c.optim.lr = 1e-4
  # Held-out subjects: report on the test split (subject-wise, never seen in training).
  every = 100 if not arg.runlocal else 4
  c.evals = {"test": {"type": "loss", "split": "test", "every_steps": every}}
  return c
