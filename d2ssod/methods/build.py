from detectron2.utils.registry import Registry


class _MethodRegistry(Registry):
    """A Detectron2 registry whose entries are registered under a config-facing name:
    ``@METHOD_REGISTRY.register("unbiased_teacher")``."""

    def register(self, name=None):
        if not isinstance(name, str):
            return super().register(name)

        def deco(cls):
            self._do_register(name, cls)
            return cls

        return deco


METHOD_REGISTRY = _MethodRegistry("SSOD_METHOD")
METHOD_REGISTRY.__doc__ = """
Registry of semi-supervised methods, keyed by the value of ``cfg.SSOD.METHOD``. A method is a
class built as ``cls(cfg, student, teacher)`` that turns an unlabeled batch into named
unsupervised losses (see :class:`d2ssod.methods.base.SSODMethod`).
"""


def build_method(cfg, student, teacher):
    """Build the method named by ``cfg.SSOD.METHOD``; the error lists the valid names."""
    name = cfg.SSOD.METHOD
    if name not in METHOD_REGISTRY:
        valid = sorted(k for k, _ in METHOD_REGISTRY)
        raise KeyError(f"SSOD.METHOD={name!r} is not a registered method; choose one of {valid}.")
    return METHOD_REGISTRY.get(name)(cfg, student, teacher)
