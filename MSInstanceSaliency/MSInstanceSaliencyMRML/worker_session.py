"""The module's side of the worker process: volumes from MRML to the worker, results back into MRML.

No Qt and no slicer.app here (slicer-core runs it in CI against a real worker process). `p` is the
module's parameter node, or anything with the same attributes (flairVolume, mprageVolume,
modelPath, device, lesionLabels, ...). The worker is sent only what it lacks: the model, the case
and the lesion labels are each re-sent when they changed, or when the worker was restarted.
"""

from __future__ import annotations

import logging

import slicer

from . import (add_saliency_volume, add_volume, array_from_volume_node, fill_lesion_table, ijk_to_ras, image_from_volume_node,
               labels_to_segmentation, lesion_table_rows, segment_mask, set_tp_probability, set_volume_from_array)


def volume_key(node):
    """Changes whenever the voxels or the geometry of a volume node change."""
    image = node.GetImageData()
    return (node.GetID(), image.GetMTime() if image is not None else 0, tuple(ijk_to_ras(node).ravel().round(6)))


def reference_volume(p):
    """The volume whose grid every output lies on: the MPRAGE, or the FLAIR for a FLAIR-only model without one."""
    return p.mprageVolume or p.flairVolume


def method_arguments(p) -> dict:
    """The worker's explain arguments for the module's method settings."""
    return dict(method="gradcampp" if p.method == "Grad-CAM++" else "smoothgrad", n_samples=int(p.nSamples), sigma=float(p.sigma),
                aggregation="max" if p.method == "SmoothGrad max" else "mean", context=p.context, layer=p.gradcamLayer or None,
                max_omega_voxels=int(p.maxOmegaVoxels) or None)


class WorkerSession:
    """One worker process (started on first use) and what it holds."""

    def __init__(self, python=None, env=None, log=None):
        self._options = dict(python=python, env=env, log=log or (lambda line: logging.info(f"[worker] {line}")))
        self._client = None

    @property
    def client(self):
        from MSInstanceSaliencyLib.worker_client import WorkerClient

        if self._client is None:
            self._client = WorkerClient(**self._options)
        return self._client

    @property
    def running(self) -> bool:
        return self._client is not None and self._client.alive

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def request(self, cmd, progress=None, on_message=None, **arguments):
        return self.client.request(cmd, progress=progress, on_message=on_message, **arguments)

    # -- what the worker holds

    def model_info(self) -> dict | None:
        """What the loaded model is and expects (its describe()), None before a model is loaded."""
        return self._client.synced.get("model_info") if self.running else None

    def info(self, device="auto", progress=None) -> dict:
        """The worker's torch build, GPUs and packages (asked once per worker process)."""
        client = self.client
        client.start()  # no-op when it runs; a new worker starts with empty `synced`
        if "info" not in client.synced:
            client.synced["info"] = self.request("info", progress, device=device)
        return client.synced["info"]

    def case_warnings(self) -> list:
        """What the user must know about the inputs the worker holds (e.g. a FLAIR covering part of the MPRAGE)."""
        return self._client.synced.get("case_warnings", []) if self.running else []

    def last_info(self):
        return self._client.synced.get("info") if self.running else None

    def sync_model(self, p, progress=None) -> dict:
        self.info(p.device, progress)
        synced = self.client.synced
        key = (p.modelPath or "", p.device)
        if synced.get("model") != key:
            synced.pop("model", None)
            synced["model_info"] = self.request("load_model", progress, model=p.modelPath or None, device=p.device)
            synced["model"] = key
            synced.pop("case", None)  # prepared for the previous model's channels and normalisation
        return synced["model_info"]

    def sync(self, p, progress=None, labels=True) -> None:
        import SimpleITK as sitk

        from MSInstanceSaliencyLib.worker import save_array

        info = self.sync_model(p, progress)
        if not p.flairVolume:
            raise ValueError("Select the FLAIR volume.")
        if not p.mprageVolume and "mprage" in info.get("input_channels", ["mprage"]):
            raise ValueError("This model needs the MPRAGE (T1) as well: select it.")
        synced, client = self.client.synced, self.client
        key = (volume_key(p.flairVolume), volume_key(p.mprageVolume) if p.mprageVolume else None)
        if synced.get("case") != key:
            synced.pop("case", None)
            synced.pop("labels", None)
            files = {}
            for name, node in (("flair", p.flairVolume), ("mprage", p.mprageVolume)):
                if node is None:
                    continue
                files[name] = client.path(f"{name}.nrrd")
                sitk.WriteImage(image_from_volume_node(node), files[name])
            synced["case_warnings"] = self.request("prepare", progress, **files).get("warnings", [])
            synced["case"] = key
        if labels and p.lesionLabels and synced.get("labels") != volume_key(p.lesionLabels):
            path = save_array(client.path("labels.npy"), array_from_volume_node(p.lesionLabels).astype("int32"))
            self.request("set_labels", progress, path=path)
            synced["labels"] = volume_key(p.lesionLabels)

    # -- the work

    def segment(self, p, progress=None) -> list:
        """Probability, labels, one segment per lesion and the lesion table, into p's nodes (created when missing)."""
        from MSInstanceSaliencyLib.worker import load_array

        self.sync(p, progress, labels=False)
        result = self.request("segment", progress, threshold=float(p.threshold), min_volume_mm3=float(p.minLesionVolume))
        prob, labels = load_array(result["probability"], remove=True), load_array(result["labels"], remove=True)
        ref = reference_volume(p)
        if p.lesionLabels:
            set_volume_from_array(p.lesionLabels, labels, ref)
        else:
            # kept (and saved with the scene) to map a clicked RAS point to its lesion id
            p.lesionLabels = add_volume(labels, ref, "MS lesion labels", "vtkMRMLLabelMapVolumeNode")
        self.client.synced["labels"] = volume_key(p.lesionLabels)  # the worker made them
        if p.probabilityVolume:
            set_volume_from_array(p.probabilityVolume, prob, ref)
        else:
            p.probabilityVolume = add_volume(prob, ref, "MS lesion probability")
        p.lesionSegmentation = labels_to_segmentation(labels, ref, p.lesionSegmentation)
        if not p.lesionTable:
            p.lesionTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "MS lesions")
        fill_lesion_table(p.lesionTable, result["table"])
        p.selectedLesion = 0
        return result["table"]

    def explain(self, p, progress=None) -> dict:
        """The map of the picked lesion (or of the custom region) as a volume on the MPRAGE geometry:
        {"node", "tp_probability" (when the map was made with the classifier's settings), "tp_note"}."""
        from MSInstanceSaliencyLib.worker import load_array, save_array

        self.sync(p, progress)
        arguments = method_arguments(p)
        if p.useCustomRegion:
            if not p.customRegionSegmentation or not p.customRegionSegmentId:
                raise ValueError("Choose the segment to explain in 'Custom region'.")
            mask = segment_mask(p.customRegionSegmentation, p.customRegionSegmentId, reference_volume(p))
            if not mask.any():
                raise ValueError("The region to explain is empty on the MPRAGE (or FLAIR-only) grid.")
            arguments["mask"] = save_array(self.client.path("region.npy"), mask)
            name = p.customRegionSegmentation.GetSegmentation().GetSegment(p.customRegionSegmentId).GetName()
        else:
            if not p.selectedLesion:
                raise ValueError("Pick a lesion first (table row or click in a view).")
            arguments["lesion_id"] = int(p.selectedLesion)
            name = f"Lesion {p.selectedLesion}"
        result = self.request("explain", progress, **arguments)
        maps = {key: load_array(path, remove=True) for key, path in result["maps"].items()}
        if arguments["method"] == "gradcampp":
            shown, title = maps["gradcampp"], f"{name} Grad-CAM++"
        else:
            shown, title = maps[p.displayChannel.lower()], f"{name} SmoothGrad {p.displayChannel}"
        replace = None if p.keepEarlierMaps or not p.saliencyVolume else p.saliencyVolume
        p.saliencyVolume = add_saliency_volume(shown, reference_volume(p), title, replace=replace)
        if result["tp_probability"] is not None:
            set_tp_probability(p.lesionTable, int(p.selectedLesion), result["tp_probability"])
        return {"node": p.saliencyVolume, "tp_probability": result["tp_probability"], "tp_note": result["tp_note"]}

    def score(self, p, lesion_ids, progress=None) -> dict:
        """{lesion id: P(TP) or None}; each probability goes into the table as soon as it arrives, so a
        cancelled run keeps the lesions already done."""
        self.sync(p, progress)
        probs = {}

        def received(msg):
            lid, prob = int(msg["lesion_id"]), msg["tp_probability"]
            probs[lid] = prob
            if prob is not None:
                set_tp_probability(p.lesionTable, lid, prob)
            elif msg.get("error"):
                logging.warning(msg["error"])

        self.request("score", progress, on_message=received, lesion_ids=[int(i) for i in lesion_ids])
        return probs

    def layers(self, p, progress=None) -> tuple[list, str]:
        """(the model's Grad-CAM++ layer names, its default layer)"""
        info = self.sync_model(p, progress)
        return info["layers"], info["gradcam_layer"]


def known_tp_probability(table_node, lesion_id):
    """A lesion's TP probability as the table holds it (also after reopening a scene), or None."""
    if table_node is None:
        return None
    for row in lesion_table_rows(table_node):
        if int(row["Lesion"]) == int(lesion_id):
            value = row["TP probability"]
            return None if value != value else value  # NaN: not computed
    return None
