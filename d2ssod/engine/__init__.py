from .checkpoint import SSODCheckpointer  # noqa: F401
from .defaults import build_cfg, build_inference_cfg  # noqa: F401
from .ema import EMATeacher, ema_momentum  # noqa: F401
from .hooks import EMAHook  # noqa: F401
from .trainer import SSODStep, SSODTrainer  # noqa: F401
