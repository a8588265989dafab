"""Annotator folders as a user would have them, with controlnet-aux's real networks at random weights.

No annotator weights can be downloaded here, so each detector's own model class (controlnet-aux
0.0.10) is built with its default random init and saved under the file name its
`from_pretrained(local_dir)` opens, in the layout the real file has (a plain state dict, or
`{"model": state_dict}` for NormalBae). Saved in fp16 to halve the bytes written (the loaders
copy into the fp32 networks). The test then loads them through the public `from_pretrained`.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch


def _save(module: torch.nn.Module, path: Path, wrap: bool = False) -> None:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    torch.save({"model": sd} if wrap else sd, path)


def write_openpose(folder: Path, seed: int = 0) -> None:
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    # Body and Hand load through util.transfer, which strips the first name part: the real files
    # are saved with the original Caffe-converted names, one level shorter than the module's.
    for cls, name in ((bodypose_model, "body_pose_model.pth"), (handpose_model, "hand_pose_model.pth")):
        sd = {k.split(".", 1)[1]: v.half() for k, v in cls().state_dict().items()}
        torch.save(sd, folder / name)
    _save(FaceNet(), folder / "facenet.pth")


def write_midas(folder: Path, seed: int = 0) -> None:
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    _save(DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True), folder / "dpt_hybrid-midas-501f0c75.pt")


def write_normalbae(folder: Path, seed: int = 0) -> None:
    from controlnet_aux.normalbae.nets.NNET import NNET

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    _save(NNET(args), folder / "scannet.pt", wrap=True)


def write_mobile_sam(folder: Path, seed: int = 0) -> None:
    """MobileSAM at random weights, except that its mask decoder is made confident: at random
    weights no mask passes SAM's quality thresholds, and the map would always be black. The
    last upscaling layer and the hypernetwork outputs become constants, so every mask covers the
    image (stability 1) and the IoU head predicts 10 (above pred_iou_thresh)."""
    from controlnet_aux.segment_anything import sam_model_registry

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sam = sam_model_registry["vit_t"]()
    dec = sam.mask_decoder
    with torch.no_grad():
        up = dec.output_upscaling[-2]  # the last ConvTranspose2d (then GELU)
        up.weight.zero_()
        up.bias.fill_(5.0)
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(1.0)
        dec.iou_prediction_head.layers[-1].weight.zero_()
        dec.iou_prediction_head.layers[-1].bias.fill_(10.0)
    _save(sam, folder / "mobile_sam.pt")
