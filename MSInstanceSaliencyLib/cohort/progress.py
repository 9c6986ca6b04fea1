"""The client's progress bar of a cohort run."""


def _passes(cfg, work) -> int:
    if cfg.saliency is None or not work or work[1] is None:
        return 0
    return int(cfg.saliency["n_samples"]) * int(work[1])


class _Progress:
    """The client's bar: lesions done of those known so far (cases are segmented as the run goes), and
    backward passes, the unit of SmoothGrad's cost."""

    def __init__(self, progress, n_cases):
        self.progress = progress
        self.n_cases, self.segmented = n_cases, 0
        self.lesions, self.lesions_done = 0, 0
        self.passes, self.passes_done = 0, 0

    def case_done(self):
        self.segmented += 1
        self._show()

    def add(self, lesions, passes):
        self.lesions += lesions
        self.passes += passes

    def lesion_done(self, passes):
        self.lesions_done += 1
        self.passes_done += passes
        self._show()

    def _show(self):
        if self.progress is None or not self.lesions:
            return
        label = f"{self.lesions_done}/{self.lesions} lesions of {self.segmented}/{self.n_cases} segmented cases"
        if self.passes:
            self.progress(label + ", backward passes", self.passes_done, self.passes)
        else:
            self.progress(label, self.lesions_done, max(self.lesions, 1))
