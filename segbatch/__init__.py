"""segbatch: batch semantic segmentation of images at scale, torchvision DeepLabV3 on Ray Data.

>>> from segbatch import RunConfig, run
>>> report = run(RunConfig(input="imgs/", output="labels/", weights="random"))
"""

__version__ = "0.1.0"

from segbatch.config import ConfigError, RunConfig  # noqa: E402
from segbatch.pipeline import RunReport, run  # noqa: E402

__all__ = ["ConfigError", "RunConfig", "RunReport", "run", "__version__"]
