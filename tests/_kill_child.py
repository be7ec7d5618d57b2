"""The child of tests/test_kill_resume.py: a seeded fit that checkpoints every few steps, announces the
moment it reaches ``--kill-step`` (in the hook ``--kill-hook``) on stdout and waits there to be killed.

Run as ``python tests/_kill_child.py CASE ROOT KILL_STEP KILL_HOOK``.
"""

import sys
import time

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from lightning_prune.testing import fit_tiny  # noqa: E402
from tests.helpers import KILL_CASES as CASES  # noqa: E402
from tests.helpers import KILL_FIT as FIT  # noqa: E402
from tests.helpers import make_kill_case as make_case  # noqa: E402


class Announce(Callback):
    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def _maybe_wait(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step:
            print(f"KILLME {trainer.global_step} {hook}", flush=True)
            while True:  # the parent sends SIGKILL now
                time.sleep(1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_wait(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._maybe_wait(trainer, "on_before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe_wait(trainer, "on_train_batch_end")


def main() -> None:
    case, root, step, hook = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    callbacks, model = make_case(case)
    saver = ModelCheckpoint(dirpath=f"{root}/ckpt", save_top_k=-1, every_n_train_steps=CASES[case]["every"],
                            filename="{step}")
    fit_tiny([*callbacks, saver, Announce(step, hook)], f"{root}/killed", model=model, **FIT)
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main()
