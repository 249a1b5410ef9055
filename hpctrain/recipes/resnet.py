"""ResNet image classification on the built-in shapes, synthetic images or an ImageNet-style folder."""
from __future__ import annotations

from hpctrain.data.images import build_image_sources
from hpctrain.recipes.base import Data, Recipe, World


class ResNet(Recipe):
    name = "resnet"

    def data(self, cfg, world: World) -> Data:
        d = cfg.data
        layout = "hwc" if cfg.dist.framework == "tf" else "chw"  # Keras convolutions are channels-last
        train, val = build_image_sources(d.dataset, d.path or None, d.image_size, d.num_classes, cfg.run.seed,
                                         d.synthetic_size, d.verify, log=world.log, layout=layout)
        return Data(train, val)

    def describe(self, cfg, data: Data, params: int) -> str:
        return cfg.model.arch

    def signature(self, cfg, data: Data | None = None) -> dict:
        return {"arch": cfg.model.arch, **({"num_classes": data.train.num_classes} if data else {})}

    def torch_model(self, cfg, data: Data):
        from hpctrain.models.resnet import build_resnet
        return build_resnet(cfg.model.arch, data.train.num_classes, cfg.model.zero_init_residual)

    def torch_task(self, cfg):
        from hpctrain.models.tasks import Classification
        return Classification(cfg.optim.label_smoothing)


    def tf_model(self, cfg, data: Data):
        from hpctrain.models.tf.resnet import build_resnet
        return build_resnet(cfg.model.arch, data.train.num_classes, cfg.data.image_size)

    def tf_task(self, cfg):
        from hpctrain.models.tf.resnet import Classification
        return Classification(cfg.optim.label_smoothing)


RECIPE = ResNet()
