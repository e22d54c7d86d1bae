"""spottune_<arch> builders in torchvision's model registry, and the launcher for unmodified scripts."""
import json
import sys

import pytest
import torch
import torchvision

import spottune_ext as st
from spottune_ext import launch
from spottune_ext.models import registry


@pytest.fixture(autouse=True)
def _clean_defaults():
    yield
    registry.set_defaults()


def test_every_architecture_is_registered():
    names = torchvision.models.list_models(module=st.models)
    assert names == sorted(f"spottune_{arch}" for arch in registry.ARCHS)
    assert set(names) <= set(torchvision.models.list_models())
    assert {"spottune_resnet50", "spottune_mobilenet_v2", "spottune_resnext50_32x4d"} <= set(names)


@pytest.mark.parametrize("arch,blocks", [("resnet50", 16), ("mobilenet_v2", 17)])
def test_builders_convert_with_strategy_options(arch, blocks):
    model = torchvision.models.get_model(f"spottune_{arch}", num_classes=5, strategy="global_k", k=2,
                                         lambda1=0.5, tau=2.0)
    assert isinstance(model, st.SpotTuneModel)
    assert model.num_routed == blocks and model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.strategy.options() == {"k": 2, "lambda1": 0.5, "lambda2": 1.0} and model.policy.tau == 2.0
    with pytest.raises(TypeError, match="unknown options"):
        torchvision.models.get_model(f"spottune_{arch}", strategy="finetune", k=2)


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    same_head = torchvision.models.get_model("spottune_resnet18", weights=str(path), num_classes=10,
                                             strategy="finetune_last_k", k=2)
    assert torch.equal(same_head.classifier.weight, plain.fc.weight)  # the trained head is kept
    assert torch.equal(same_head.backbone.layer1[0].conv1.weight, plain.layer1[0].conv1.weight)
    routed = torchvision.models.get_model("spottune_resnet18", weights=path, num_classes=3)
    assert routed.classifier.out_features == 3
    assert torch.equal(routed.backbone.layer4[1].frozen.conv2.weight, plain.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="not a mobilenet_v2 state dict"):
        torchvision.models.get_model("spottune_mobilenet_v2", weights=path)


def test_weights_by_name_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        torchvision.models.get_model("spottune_resnet34", weights="ResNet34_Weights.IMAGENET1K_V1")


def test_defaults_and_explicit_arguments():
    registry.set_defaults(strategy="l2sp", alpha=0.5, extra_loss_scale=0.25)
    model = torchvision.models.get_model("spottune_resnet18", num_classes=2)
    assert model.strategy.name == "l2sp" and model.strategy.alpha == 0.5 and model.extra_loss_scale == 0.25
    assert torchvision.models.get_model("spottune_resnet18", alpha=0.25).strategy.alpha == 0.25


def test_launcher_runs_a_script_with_the_builders(tmp_path, monkeypatch):
    script = tmp_path / "client.py"
    (tmp_path / "helper.py").write_text("VALUE = 7\n")  # the script's own directory comes first on sys.path
    script.write_text(
        "import json, sys, torchvision, helper\n"
        "model = torchvision.models.get_model(sys.argv[1], num_classes=int(sys.argv[2]))\n"
        "with open(sys.argv[3], 'w') as f:\n"
        "    json.dump({'options': model.strategy.options(), 'classes': model(__import__('torch').randn(1, 3, 32, 32))"
        ".shape[1], 'argv': sys.argv, 'helper': helper.VALUE, 'name': __name__}, f)\n")
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    launch.main(["--strategy", "global_k", "--option", "k=1", "--option", "lambda2=0.5", str(script),
                 "spottune_resnet18", "4", str(out)])
    result = json.loads(out.read_text())
    assert result["name"] == "__main__" and result["helper"] == 7
    assert result["argv"] == [str(script), "spottune_resnet18", "4", str(out)] and result["classes"] == 4
    assert result["options"] == {"k": 1, "lambda1": 1.0, "lambda2": 0.5}


def test_launcher_errors():
    with pytest.raises(SystemExit, match="unknown strategy 'nope'"):
        launch.defaults(launch.parse_args(["--strategy", "nope", "x.py"]))
    with pytest.raises(SystemExit, match="no script"):
        launch.main(["/nonexistent/x.py"])
    assert launch.parse_args(["--option", "adaptive_blocks=[4, 5]", "--option", "backend=cpp", "x.py", "--k", "1"]
                             ).option == [("adaptive_blocks", [4, 5]), ("backend", "cpp")]
