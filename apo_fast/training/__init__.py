"""Training: the APO trainer on a DeepSpeed engine (:mod:`.trainer`), the data stream it
reads (:mod:`.streaming`), the trained module and condition file (:mod:`.model`),
checkpoints (:mod:`.checkpoints`), DeepSpeed plumbing and the optimizer
(:mod:`.distributed`) and base-model pretraining (:mod:`.pretrain`)."""
from apo_fast.training.checkpoints import latest_checkpoint, list_checkpoints
from apo_fast.training.distributed import shutdown_distributed
from apo_fast.training.trainer import APOTrainer

__all__ = ["APOTrainer", "latest_checkpoint", "list_checkpoints", "shutdown_distributed"]
