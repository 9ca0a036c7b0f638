"""Config ownership: shared keys in add_ssod_config, each method's keys in its own class."""
import pytest
from detectron2.config import CfgNode as CN

import d2ssod  # noqa: F401
from d2ssod.config import get_ssod_cfg, validate_ssod_config
from d2ssod.engine.defaults import _check_datasets
from d2ssod.methods import METHOD_REGISTRY, SSODMethod


def test_each_method_declares_its_own_keys():
    owned = {"unbiased_teacher": ("UNBIASED_TEACHER", {"SCORE_THRESH"}),
             "soft_teacher": ("SOFT_TEACHER", {"CLS_THRESH", "REG_THRESH", "JITTER_TIMES",
                                               "JITTER_SCALE", "UNCERTAINTY_THRESH",
                                               "SOFT_BG_WEIGHT"})}
    for name, (node, keys) in owned.items():
        cfg = CN({"SSOD": CN()})
        METHOD_REGISTRY.get(name).add_config(cfg)
        assert set(cfg.SSOD[node]) == keys
    full = get_ssod_cfg()
    assert full.SSOD.SOFT_TEACHER.CLS_THRESH == 0.9
    assert full.SSOD.UNBIASED_TEACHER.SCORE_THRESH == 0.7
    assert full.SSOD.SED.REWEIGHT_GAMMA == 1.0 and full.SSOD.SED.SCALE_CONSISTENCY is False


def test_the_sed_node_is_declared_and_checked_in_one_place():
    """SSOD.SED is shared (scale consistency: sed and soft_teacher; distillation: sed): the
    scale-consistency component declares all of it, the SED method adds nothing."""
    from d2ssod.modeling.scale_consistency import add_sed_config

    cfg = CN({"SSOD": CN()})
    add_sed_config(cfg)
    assert set(cfg.SSOD.SED) == {"SCALE_CONSISTENCY", "RPN_SCALE_WEIGHT", "ROI_SCALE_WEIGHT",
                                 "ROI_SAMPLES_PER_IMAGE", "REWEIGHT_GAMMA",
                                 "RPN_DISTILL_WEIGHT", "ROI_DISTILL_WEIGHT", "LOG_SCORE_THRESH"}
    bare = CN({"SSOD": CN()})
    METHOD_REGISTRY.get("sed").add_config(bare)
    assert bare.SSOD == CN()
    full = get_ssod_cfg()
    full.SSOD.METHOD = "soft_teacher"
    full.SSOD.SED.LOG_SCORE_THRESH = 1.5
    with pytest.raises(ValueError, match="SSOD.SED.LOG_SCORE_THRESH=1.5"):
        validate_ssod_config(full)


@pytest.fixture
def new_method():
    """A method registered the way a new methods/<name>.py would register one."""

    @METHOD_REGISTRY.register("toy_teacher")
    class ToyTeacher(SSODMethod):
        supports_scale_consistency = False

        @classmethod
        def add_config(cls, cfg):
            cfg.SSOD.TOY_TEACHER = CN()
            cfg.SSOD.TOY_TEACHER.THRESH = 0.5  # a comment, as every key has

        @classmethod
        def validate_config(cls, cfg):
            super().validate_config(cfg)
            if cfg.SSOD.TOY_TEACHER.THRESH > 1:
                raise ValueError("SSOD.TOY_TEACHER.THRESH must be <= 1.")

        def pseudo_label(self, unlabeled):
            return [], {}

    yield ToyTeacher
    METHOD_REGISTRY._obj_map.pop("toy_teacher")


def test_a_registered_method_brings_its_keys_validation_and_teacher_flag(new_method):
    cfg = get_ssod_cfg()
    assert cfg.SSOD.TOY_TEACHER.THRESH == 0.5
    cfg.SSOD.METHOD = "toy_teacher"
    validate_ssod_config(cfg)
    cfg.SSOD.TOY_TEACHER.THRESH = 2.0
    with pytest.raises(ValueError, match="SSOD.TOY_TEACHER.THRESH"):
        validate_ssod_config(cfg)
    cfg.SSOD.TOY_TEACHER.THRESH = 0.5
    cfg.SSOD.SED.SCALE_CONSISTENCY = True
    with pytest.raises(ValueError, match="SCALE_CONSISTENCY=True is not implemented for "
                                         "SSOD.METHOD 'toy_teacher'"):
        validate_ssod_config(cfg)
    # the dataset check asks the method whether it reads unlabeled data
    cfg.SSOD.SED.SCALE_CONSISTENCY = False
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.DATASETS.TRAIN_UNLABELED = (), (), ()
    with pytest.raises(ValueError, match="'toy_teacher' needs unlabeled data"):
        _check_datasets(cfg)
    new_method.uses_teacher = False
    _check_datasets(cfg)


def test_scale_consistency_is_accepted_by_the_methods_that_support_it():
    for name in ("sed", "soft_teacher"):
        cfg = get_ssod_cfg()
        cfg.SSOD.METHOD, cfg.SSOD.SED.SCALE_CONSISTENCY = name, True
        validate_ssod_config(cfg)
    cfg.SSOD.METHOD = "unbiased_teacher"
    with pytest.raises(ValueError, match="SCALE_CONSISTENCY"):
        validate_ssod_config(cfg)
