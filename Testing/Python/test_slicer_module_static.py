"""Static checks of the Slicer module (no Slicer needed): the file compiles, the .ui and the code agree,
the CMake files install every Python file, and heavy packages are never imported at module level."""

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "MSInstanceSaliency"
MODULE_PY = MODULE / "MSInstanceSaliency.py"
UI = MODULE / "Resources" / "UI" / "MSInstanceSaliency.ui"
HEAVY = {"torch", "monai", "radiomics", "sklearn", "nilearn"}


def ui_tree():
    return ET.parse(UI).getroot()


def test_module_compiles():
    py_compile.compile(str(MODULE_PY), doraise=True)
    for f in (MODULE / "MSInstanceSaliencyMRML").glob("*.py"):
        py_compile.compile(str(f), doraise=True)


def test_ui_top_level_is_qmrmlwidget():
    top = ui_tree().find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MSInstanceSaliency"


def test_every_ui_reference_exists_in_the_ui_file():
    names = {w.get("name") for w in ui_tree().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert used, "the module uses no widgets?"
    assert used <= names, f"missing in the .ui: {sorted(used - names)}"


def parameter_fields():
    tree = ast.parse(MODULE_PY.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MSInstanceSaliencyParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_slicer_parameter_name_is_a_parameter_node_field():
    fields = parameter_fields()
    bound = []
    for w in ui_tree().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound.append(p.find("string").text)
    assert bound and set(bound) <= fields, f"unknown parameters: {sorted(set(bound) - fields)}"
    assert len(bound) == len(set(bound)), "a parameter is bound to two widgets"


def test_no_top_level_import_of_heavy_packages():
    tree = ast.parse(MODULE_PY.read_text())
    top = set()
    for n in tree.body:
        if isinstance(n, ast.Import):
            top |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            top.add(n.module.split(".")[0])
        elif isinstance(n, ast.Try):  # the guarded Lib import
            for m in ast.walk(n):
                if isinstance(m, ast.Import):
                    top |= {a.name.split(".")[0] for a in m.names}
    assert not (top & HEAVY), f"heavy packages imported at module level: {top & HEAVY}"
    # the Lib's package __init__ and the MRML adapter must stay light too
    for f in (ROOT / "MSInstanceSaliencyLib" / "__init__.py", MODULE / "MSInstanceSaliencyMRML" / "__init__.py"):
        mods = {a.name.split(".")[0] for n in ast.parse(f.read_text()).body if isinstance(n, ast.Import) for a in n.names}
        assert not (mods & HEAVY), f


def _cmake_list(path, var):
    text = path.read_text()
    m = re.search(r"set\(" + var + r"\s+(.*?)\)", text, re.S)
    return [t.replace("${MODULE_NAME}", path.parent.name) for t in m.group(1).split()]


def test_cmake_installs_every_python_file():
    lib = ROOT / "MSInstanceSaliencyLib"
    listed = set(_cmake_list(lib / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    assert listed == {p.name for p in lib.glob("*.py")}
    assert "WITH_SUBDIR" in (lib / "CMakeLists.txt").read_text()
    listed = set(_cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    actual = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")}
    assert listed == actual
    resources = set(_cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"))
    assert all((MODULE / r).is_file() for r in resources)
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(MSInstanceSaliencyLib)" in top and "add_subdirectory(MSInstanceSaliency)" in top
    assert 'EXTENSION_DEPENDS "PyTorch"' in top


def test_icons_are_128_pixels():
    from PIL import Image

    for p in (MODULE / "Resources" / "Icons" / "MSInstanceSaliency.png", ROOT / "Resources" / "MSInstanceSaliency.png"):
        assert Image.open(p).size == (128, 128)
