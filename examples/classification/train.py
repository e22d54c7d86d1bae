"""A classification training script in the style of torchvision's reference script
(references/classification/train.py): it builds its model by name through torchvision's model registry
and knows nothing of spottune_ext. Run it through the launcher to train a SpotTune model:

    python -m spottune_ext.launch --strategy global_k --option k=3 examples/classification/train.py \
        --model spottune_resnet50 --weights ResNet50_Weights.IMAGENET1K_V2 --data-path DIR \
        --lr-scheduler cosineannealinglr --model-ema --output-dir runs/r50

DIR holds train/ and val/ in ImageFolder layout. --resume continues from a checkpoint, --test-only
evaluates one. Plain names (--model resnet50) train torchvision's own models.
"""
import argparse
import os
import time

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2 as T


def get_args_parser():
    parser = argparse.ArgumentParser(description="Image classification training", add_help=True)
    parser.add_argument("--data-path", required=True, help="folder with train/ and val/ in ImageFolder layout")
    parser.add_argument("--model", default="resnet18", help="a name in torchvision.models.list_models()")
    parser.add_argument("--weights", default=None, help="weights name (or file, for spottune_* models)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-b", "--batch-size", default=32, type=int)
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument("-j", "--workers", default=0, type=int)
    parser.add_argument("--lr", default=0.1, type=float)
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("--norm-weight-decay", default=None, type=float, help="weight decay of normalisation layers")
    parser.add_argument("--label-smoothing", default=0.0, type=float)
    parser.add_argument("--lr-scheduler", default="steplr", choices=["steplr", "cosineannealinglr"])
    parser.add_argument("--lr-step-size", default=30, type=int)
    parser.add_argument("--lr-gamma", default=0.1, type=float)
    parser.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the model")
    parser.add_argument("--model-ema-decay", default=0.99, type=float)
    parser.add_argument("--train-crop-size", default=224, type=int)
    parser.add_argument("--val-resize-size", default=256, type=int)
    parser.add_argument("--val-crop-size", default=224, type=int)
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--resume", default="", help="checkpoint to resume from")
    parser.add_argument("--test-only", action="store_true")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def load_data(args):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_tf = T.Compose([T.RandomResizedCrop(args.train_crop_size, antialias=True), T.RandomHorizontalFlip(),
                          T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    val_tf = T.Compose([T.Resize(args.val_resize_size, antialias=True), T.CenterCrop(args.val_crop_size),
                        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    train = torchvision.datasets.ImageFolder(os.path.join(args.data_path, "train"), train_tf)
    val = torchvision.datasets.ImageFolder(os.path.join(args.data_path, "val"), val_tf)
    return train, val


def parameter_groups(model, weight_decay, norm_weight_decay):
    """Weight decay per parameter: norm_weight_decay for normalisation layers when given."""
    if norm_weight_decay is None:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norms = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    return [{"params": [p for p in model.parameters() if id(p) not in norms], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) in norms], "weight_decay": norm_weight_decay}]


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, model_ema):
    model.train()
    total, correct, loss_sum, start = 0, 0, 0.0, time.time()
    for image, target in loader:
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if model_ema is not None:
            model_ema.update_parameters(model)
        total += target.numel()
        correct += (output.argmax(1) == target).sum().item()
        loss_sum += loss.item() * target.numel()
    print(f"Epoch: [{epoch}] loss {loss_sum / total:.4f} acc@1 {100 * correct / total:.2f} "
          f"lr {optimizer.param_groups[0]['lr']:.5f} time {time.time() - start:.1f}s")


@torch.no_grad()
def evaluate(model, criterion, loader, device, prefix=""):
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for image, target in loader:
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss_sum += criterion(output, target).item() * target.numel()
        correct += (output.argmax(1) == target).sum().item()
        total += target.numel()
    print(f"Test: {prefix}Acc@1 {100 * correct / total:.3f} loss {loss_sum / total:.6f}")
    return correct / total


def main(args):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, val = load_data(args)
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                               num_workers=args.workers, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size, num_workers=args.workers)

    model = torchvision.models.get_model(args.model, weights=args.weights, num_classes=len(train.classes))
    model.to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay, args.norm_weight_decay), lr=args.lr,
                                momentum=args.momentum)
    if args.lr_scheduler == "cosineannealinglr":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    model_ema = None
    if args.model_ema:
        model_ema = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema_decay),
                                  use_buffers=True)

    start_epoch = 0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        if not args.test_only:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch = checkpoint["epoch"] + 1
        if model_ema is not None:
            model_ema.load_state_dict(checkpoint["model_ema"])

    if args.test_only:
        evaluate(model_ema if model_ema is not None else model, criterion, val_loader, device,
                 "EMA " if model_ema is not None else "")
        return

    for epoch in range(start_epoch, args.epochs):
        train_one_epoch(model, criterion, optimizer, train_loader, device, epoch, model_ema)
        scheduler.step()
        evaluate(model, criterion, val_loader, device)
        if model_ema is not None:
            evaluate(model_ema, criterion, val_loader, device, "EMA ")
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "lr_scheduler": scheduler.state_dict(), "epoch": epoch}
        if model_ema is not None:
            checkpoint["model_ema"] = model_ema.state_dict()
        os.makedirs(args.output_dir, exist_ok=True)
        torch.save(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
