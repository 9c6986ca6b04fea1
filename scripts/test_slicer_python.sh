#!/usr/bin/env bash
# Run the test suite under a Python pinned like 3D Slicer 5.10's (Python 3.12, numpy 2.0.2,
# scipy 1.13.1, ...; scripts/slicer-python-constraints.txt), in .venv-slicer, set up if needed
# by scripts/setup_slicer_env.sh. Extra arguments go to pytest. pyradiomics cannot be installed
# there, so the tests that need it are skipped (needs_radiomics in Testing/Python/conftest.py).
#
# It runs the tests of what runs inside Slicer: the Lib that the worker process uses (volumes,
# preprocessing, model, inference and instances, saliency, scoring, the worker itself), the MRML
# adapter and worker session, the rendering and the module's static checks. The research commands
# that Slicer never runs (the CLI, feature tables, experiments, training, reports) are tested in
# the main run only; every Lib function they share is covered here by the files below.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_slicer_env.sh"
cd "$ROOT"
echo "=== tests under Slicer-5.10-pinned Python ($("$ROOT/.venv-slicer/bin/python" -c 'import platform, numpy, scipy; print("python", platform.python_version(), "numpy", numpy.__version__, "scipy", scipy.__version__)'); .venv-slicer) ===" >&2
SLICER_SIDE_TESTS=(
  test_volumes.py test_preprocessing.py test_model.py test_instances.py test_evaluation.py test_phantom.py
  test_saliency.py test_radiomics.py test_worker.py test_worker_session.py test_dependencies.py
  test_mrml_adapter.py test_workflow.py test_rendering.py test_slicer_module_static.py test_slicer_module_widget.py
)
# Left to the main run: tests of the demo model's behaviour and of the phantom's anatomy on 1 mm volumes (making a
# 1 mm phantom takes half a minute), which check no package that Slicer pins differently and which the module never runs.
MAIN_RUN_ONLY=(
  test_preprocessing.py::test_zero_padding_keeps_the_lesions_of_the_demo_model
  test_phantom.py::test_head_layers_have_their_tissues_brightness
  test_phantom.py::test_normal_hyperintensities_are_bright_and_marked_as_mimics
  test_phantom.py::test_gm_brighter_than_wm_on_flair_at_1mm
  test_phantom.py::test_lesion_contrast_ranges_from_subtle_to_bright
)
exec "$ROOT/.venv-slicer/bin/python" -m pytest "${SLICER_SIDE_TESTS[@]/#/Testing/Python/}" "${MAIN_RUN_ONLY[@]/#/--deselect=Testing/Python/}" "$@"
