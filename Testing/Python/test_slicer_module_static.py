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
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text(encoding="utf-8")))
    assert used, "the module uses no widgets?"
    assert used <= names, f"missing in the .ui: {sorted(used - names)}"


def parameter_fields():
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
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
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
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
    # the Lib's package __init__ (and its subpackages'), and the MRML adapter must stay light too
    for f in [*(ROOT / "MSInstanceSaliencyLib").glob("**/__init__.py"), ROOT / "MSInstanceSaliencyLib" / "dependencies.py",
              ROOT / "MSInstanceSaliencyLib" / "errors.py", *(MODULE / "MSInstanceSaliencyMRML").glob("*.py")]:
        mods = {a.name.split(".")[0] for n in ast.parse(f.read_text(encoding="utf-8")).body if isinstance(n, ast.Import) for a in n.names}
        assert not (mods & HEAVY), f


def _cmake_list(path, var):
    text = path.read_text(encoding="utf-8")
    m = re.search(r"set\(" + var + r"\s+(.*?)\)", text, re.S)
    return [t.replace("${MODULE_NAME}", path.parent.name) for t in m.group(1).split()]


def test_cmake_installs_every_python_file():
    lib = ROOT / "MSInstanceSaliencyLib"
    listed = set(_cmake_list(lib / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    assert listed == {str(p.relative_to(lib)) for p in lib.rglob("*.py")}  # subpackages too, with their folders
    assert "WITH_SUBDIR" in (lib / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(_cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    # the browser face (msis view) needs trame, which Slicer does not have: it is not installed into Slicer
    actual = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "MSInstanceSaliencyWeb" not in p.parts}
    assert listed == actual
    resources = set(_cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"))
    assert all((MODULE / r).is_file() for r in resources)
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(MSInstanceSaliencyLib)" in top and "add_subdirectory(MSInstanceSaliency)" in top
    assert 'EXTENSION_DEPENDS "PyTorch SlicerRadiomics"' in top  # pyradiomics comes from SlicerRadiomics


def test_cmake_puts_the_models_beside_the_lib_in_build_and_install_trees():
    """The demo model must be found by build-tree tests too; paths from PROJECT_SOURCE_DIR, which stays
    right when the extension is built inside another project (CMAKE_SOURCE_DIR does not)."""
    texts = {p: p.read_text(encoding="utf-8") for p in ROOT.glob("**/CMakeLists.txt") if ".venv" not in p.parts}
    assert not [p for p, t in texts.items() if "CMAKE_SOURCE_DIR" in t]
    lib = texts[ROOT / "MSInstanceSaliencyLib" / "CMakeLists.txt"]
    for folder in ("Models", "LesionMasks"):
        assert "${PROJECT_SOURCE_DIR}/Resources/" + folder in lib or "${PROJECT_SOURCE_DIR}/Resources/${_dir}" in lib
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources" in lib
    assert "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources" in lib and "copy_directory" in lib


def test_ready_for_the_extensions_index():
    """The catalog entry as the 5.10 index schema allows it (no other keys), with the build dependencies
    that EXTENSION_DEPENDS names; a LICENSE; icon and screenshot URLs that point at committed files."""
    import json

    entry = json.loads((ROOT / "docs" / "extensions-index" / "MSInstanceSaliency.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision", "scm_type", "scm_url", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["build_dependencies"] == ["PyTorch", "SlicerRadiomics"]
    assert "Slicer" in entry["scm_url"].rsplit("/", 1)[-1]  # the index wants "Slicer" in the repository name
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for var in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(var + r' "([^"]+)"', top).group(1).split()
        assert urls
        for url in urls:
            assert url.startswith(entry["scm_url"].replace("github.com", "raw.githubusercontent.com") + "/main/")
            assert (ROOT / url.split("/main/", 1)[1]).is_file(), url
    assert re.search(r'EXTENSION_CONTRIBUTORS "[^"(]+ \([^)]+\)"', top)  # "Name (Affiliation)"


def test_icons_are_128_pixels():
    from PIL import Image

    for p in (MODULE / "Resources" / "Icons" / "MSInstanceSaliency.png", ROOT / "Resources" / "MSInstanceSaliency.png"):
        assert Image.open(p).size == (128, 128)


# What Python can reach on the qMRML/CTK widgets the module uses (PythonQt exposes slots, Q_INVOKABLE
# methods, properties and signals, not plain public C++ methods), from the Slicer 5.10 headers
# (Libs/MRML/Widgets/qMRMLTableView.h, qMRMLSegmentSelectorWidget.h, qMRMLNodeComboBox.h; CTK at the commit
# Slicer 5.10 pins: Libs/Widgets/ctkPathLineEdit.h, ctkSliderWidget.h), plus what their Qt base classes give
# (Qt classes are wrapped whole: QTableView's selectRow/clearSelection/selectionModel, QWidget's properties).
QT_WIDGET = {"connect", "enabled", "toolTip", "visible", "blockSignals"}
REACHABLE = {
    "qMRMLTableView": QT_WIDGET | {"setMRMLTableNode", "mrmlTableNode", "tableModel", "sortFilterProxyModel", "transposed",
                                   "selectionModel", "selectRow", "selectColumn", "clearSelection", "setMRMLScene"},
    "qMRMLSegmentSelectorWidget": QT_WIDGET | {"currentNode", "currentNodeID", "currentSegmentID", "setCurrentNode", "setCurrentNodeID",
                                               "setCurrentSegmentID", "segmentIDs", "setMRMLScene"},
    "ctkPathLineEdit": QT_WIDGET | {"currentPath", "setCurrentPath", "filters", "nameFilters", "options"},
    "ctkSliderWidget": QT_WIDGET | {"value", "minimum", "maximum", "singleStep"},
    "qMRMLNodeComboBox": QT_WIDGET | {"currentNode", "setCurrentNode", "currentNodeID", "setMRMLScene"},
}
NOT_REACHABLE = {"mrmlTableRowIndex", "mrmlTableColumnIndex", "selectedMRMLTableColumnIndices"}  # plain C++ methods


def _ui_member_uses():
    """(widget name, member) for self.ui.NAME.MEMBER and for local aliases such as `view = self.ui.NAME`."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))

    def ui_name(node):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"):
            return node.attr
        return None

    uses = set()
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        aliases = {}
        for n in ast.walk(func):
            if isinstance(n, ast.Assign):
                targets = n.targets[0].elts if isinstance(n.targets[0], ast.Tuple) else [n.targets[0]]
                values = n.value.elts if isinstance(n.value, ast.Tuple) else [n.value]
                for t, v in zip(targets, values):
                    if isinstance(t, ast.Name) and ui_name(v):
                        aliases[t.id] = ui_name(v)
        for n in ast.walk(func):
            if isinstance(n, ast.Attribute):
                if ui_name(n.value):
                    uses.add((ui_name(n.value), n.attr))
                elif isinstance(n.value, ast.Name) and n.value.id in aliases:
                    uses.add((aliases[n.value.id], n.attr))
    return uses


def test_qmrml_and_ctk_calls_are_reachable_from_python():
    classes = {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}
    uses = _ui_member_uses()
    assert ("lesionTableView", "sortFilterProxyModel") in uses  # the alias tracking sees the table code
    bad = sorted((name, member, classes[name]) for name, member in uses
                 if classes[name] in REACHABLE and member not in REACHABLE[classes[name]])
    assert not bad, f"not reachable from Python (check the class's header): {bad}"
    assert not [m for _n, m in uses if m in NOT_REACHABLE]
    assert ".mrmlTableRowIndex(" not in MODULE_PY.read_text(encoding="utf-8")
