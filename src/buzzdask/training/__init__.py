"""Training a detector head on labelled audio: embed on the cluster, fit, write a model directory.

The frames are embedded exactly as an analysis embeds them (:mod:`~buzzdask.training.embed`) and
cached (:mod:`~buzzdask.store`), so a second training on the same audio embeds nothing.
The head is fitted with ``tf_keras`` on the client (:mod:`~buzzdask.training.head`) and written
in buzzdetect's model format, which :func:`buzzdask.analyze` reads directly. Which frames are
trained on, and with which labels, is :mod:`~buzzdask.training.labels`'s rule; what the directory
records beside the head is :mod:`~buzzdask.training.records`'s; :mod:`~buzzdask.training.trainer`
runs the whole (:func:`train`).
"""

from buzzdask.training.head import precision_recall
from buzzdask.training.labels import LABEL_COLUMNS, read_labels
from buzzdask.training.records import TrainingResult
from buzzdask.training.trainer import train

__all__ = [
    # functions
    "precision_recall",
    "read_labels",
    "train",
    # classes
    "TrainingResult",
    # constants
    "LABEL_COLUMNS",
]
