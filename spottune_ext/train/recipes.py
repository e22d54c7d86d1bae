"""The low-data recipes of the accuracy study (bench/ACCURACY.md), shared by the study and `make demo`.

A recipe is a source network (pre-trained weights, image size, SpotTune's policy network sized to it),
the low-data settings and each strategy's learning rate. The learning rates are the ones the study's
tuning runs chose on validation accuracy (bench/accuracy/tune/; a test checks that they still agree).
"""
from ..models import MOBILENET_V2_OFFLINE
from ..pretrain import ASSETS, NAME as FASHION_NAME

FASHION_RESNET = ASSETS / f"{FASHION_NAME}.pt"

IMAGES_PER_CLASS = 25  # the low-data regime: fine-tuning over-fits, freezing under-fits
EVAL_PER_CLASS = 60    # validation and test images per class
EPOCHS = 15
BATCH = 25

# name -> title, trainer arguments (the weights path as "{fashion_resnet}"), SpotTune's policy network.
SOURCES = {
    "mnv2-imagenet": {
        "title": "MobileNetV2, ImageNet (torchvision)",
        "args": ["--arch", "mobilenet_v2", "--weights", MOBILENET_V2_OFFLINE, "--image-size", "32"],
        "policy": ["--policy-widths", "32", "64", "--policy-input-size", "32"],
    },
    "r26-fashion": {
        "title": "ResNet-26/16, Fashion-MNIST (spottune_ext/assets)",
        "args": ["--weights", "{fashion_resnet}", "--image-size", "32"],
        "policy": ["--policy-stem-width", "16", "--policy-widths", "16", "32"],
    },
}

# Strategies: name -> trainer arguments ("{policy}" marks where the source's policy arguments go).
STRATEGIES = {
    "spottune": ["--strategy", "spottune", "{policy}"],
    "finetune": ["--strategy", "finetune"],
    "feature_extractor": ["--strategy", "feature_extractor"],
    "finetune_last_3": ["--strategy", "finetune_last_k", "--strategy-opt", "k=3"],
    "l2sp": ["--strategy", "l2sp"],
    "global_k": ["--strategy", "global_k", "--global-k", "3", "{policy}"],
    "spottune_tuned_only": ["--strategy", "spottune_tuned_only", "{policy}"],
}

# (source, strategy) -> learning rate, as the study's tuning chose it.
LEARNING_RATES = {
    ("mnv2-imagenet", "spottune"): 0.001, ("mnv2-imagenet", "finetune"): 0.001,
    ("mnv2-imagenet", "feature_extractor"): 0.01, ("mnv2-imagenet", "finetune_last_3"): 0.003,
    ("mnv2-imagenet", "l2sp"): 0.001, ("mnv2-imagenet", "global_k"): 0.01,
    ("mnv2-imagenet", "spottune_tuned_only"): 0.001,
    ("r26-fashion", "spottune"): 0.1, ("r26-fashion", "finetune"): 0.1, ("r26-fashion", "feature_extractor"): 0.1,
    ("r26-fashion", "finetune_last_3"): 0.1, ("r26-fashion", "l2sp"): 0.03, ("r26-fashion", "global_k"): 0.1,
    ("r26-fashion", "spottune_tuned_only"): 0.1,
}


def arguments(source, strategy, target, lr, seed, fashion_resnet=FASHION_RESNET, images_per_class=IMAGES_PER_CLASS,
              eval_per_class=EVAL_PER_CLASS, epochs=EPOCHS, batch=BATCH):
    """The trainer's arguments (without --threads, --out) for one run of a recipe."""
    src = SOURCES[source]
    args = [str(fashion_resnet) if a == "{fashion_resnet}" else a for a in src["args"]]
    strategy_args = []
    for arg in STRATEGIES[strategy]:
        strategy_args += src["policy"] if arg == "{policy}" else [arg]
    return [*args, "--data", target, *strategy_args, "--max-per-class", str(images_per_class),
            "--max-eval-per-class", str(eval_per_class), "--epochs", str(epochs), "--batch-size", str(batch),
            "--lr", str(lr), "--seed", str(seed)]
