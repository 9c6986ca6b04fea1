"""Probe: channel dropout (p=0.5) on the top-level skip copy during training, so the shallow path cannot carry the answer."""
import torch
from MSInstanceSaliencyLib.research import training
from MSInstanceSaliencyLib.models import monai as M

orig_build = M.build_network

def build_with_skip_dropout(spec):
    net = orig_build(spec)
    skip = net.model[1]
    drop = torch.nn.Dropout3d(0.5)
    skip.add_module("skip_dropout", drop)  # no parameters: the saved weights are the plain UNet's
    n_top = spec.network_args["channels"][0]

    def hook(module, inputs, output):
        if not module.training:
            return output
        return torch.cat([drop(output[:, :n_top]), output[:, n_top:]], dim=1)

    skip.register_forward_hook(hook)
    return net

training.build_network = build_with_skip_dropout
training.CONFIGS["probe"] = dict(training.CONFIGS["demo"])
training.train("/tmp/probe_skipdrop", "probe", iterations=3000, cache_dir=".cache/phantoms")
