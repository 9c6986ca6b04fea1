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


def _cmake_set(text, var):
    """The words of set(VAR "...") in a CMakeLists text."""
    m = re.search(r'set\(' + var + r'\s+"([^"]*)"\)', text)
    assert m, var
    return m.group(1).split()


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
    # PyTorch only: SlicerRadiomics (pyradiomics) is offered from the module, never a build dependency (it does not
    # build on macOS, and the extensions factory builds an extension only after its dependencies)
    assert _cmake_set(top, "EXTENSION_DEPENDS") == ["PyTorch"]


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
    assert entry["build_dependencies"] == ["PyTorch"]
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


def test_extensions_index_entry_agrees_with_the_cmakelists():
    """What the index's scripts/check_description_files.py compares: the JSON file is named after project(),
    the category is one the index accepts, and one icon URL and at least one screenshot URL are set the way
    its patterns read them; plus what must agree by hand: build_dependencies = EXTENSION_DEPENDS, the
    category, and a homepage in the repository that scm_url names."""
    import json

    path = ROOT / "docs" / "extensions-index" / "MSInstanceSaliency.json"
    entry = json.loads(path.read_text(encoding="utf-8"))
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\s*\(\s*([^\s)]+)", top).group(1) == path.stem
    assert entry["build_dependencies"] == _cmake_set(top, "EXTENSION_DEPENDS")
    assert "SlicerRadiomics" not in entry["build_dependencies"]
    assert [entry["category"]] == [" ".join(_cmake_set(top, "EXTENSION_CATEGORY"))] == ["Segmentation"]
    assert " ".join(_cmake_set(top, "EXTENSION_HOMEPAGE")).startswith(entry["scm_url"] + "#")
    assert len(re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', top)) == 1
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', top)
    assert shots and all(u.startswith("https://") and u.endswith(".png") for u in shots[0].split())
    assert (ROOT / "docs" / "screenshots" / "slicer_views.png").is_file()


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for p in (MODULE / "Resources" / "Icons" / "MSInstanceSaliency.png", ROOT / "Resources" / "MSInstanceSaliency.png"):
        with Image.open(p) as image:
            assert (image.format, image.size) == ("PNG", (128, 128)), p


# What Slicer's Python has at a module's file scope (the index's review: no non-standard package imported
# there): the standard library, Slicer's own modules and the Python packages Slicer ships (numpy, SimpleITK:
# SuperBuild/External_python-*.cmake on the 5.10 branch), and our own packages
SLICER_PROVIDED = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "mrml", "numpy", "SimpleITK", "__future__"}
OUR_PACKAGES = {"MSInstanceSaliencyLib": ROOT / "MSInstanceSaliencyLib", "MSInstanceSaliencyMRML": MODULE / "MSInstanceSaliencyMRML"}


def _file_scope_imports(path):
    """Absolute module names imported at a file's top level (also inside top-level try/if blocks, not under
    `if TYPE_CHECKING:`), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = None
    for name, root in OUR_PACKAGES.items():
        if root in path.parents:
            package = [name, *path.relative_to(root).parent.parts]
    found = []

    def visit(body):
        for n in body:
            if isinstance(n, ast.Import):
                found.extend(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                # "from pkg import name": name may be a submodule, so both are candidates
                module = ".".join(package[:len(package) - n.level + 1] + [n.module or ""]).strip(".") if n.level else n.module
                found.extend([module, *(f"{module}.{a.name}" for a in n.names)])
            elif isinstance(n, ast.Try):
                visit(n.body)
                for h in n.handlers:
                    visit(h.body)
            elif isinstance(n, ast.If) and "TYPE_CHECKING" not in ast.unparse(n.test):
                visit(n.body)
                visit(n.orelse)

    visit(tree.body)
    return found


def _our_files(module):
    """The file of one of our modules and its packages' __init__ files (all run when it is imported)."""
    parts = module.split(".")
    root = OUR_PACKAGES[parts[0]]
    files = [root.joinpath(*parts[1:i], "__init__.py") for i in range(1, len(parts) + 1)]
    files.append(root.joinpath(*parts[1:]).with_suffix(".py"))
    return [f for f in files if f.is_file()]


def test_file_scope_imports_are_what_slicer_ships():
    """Loading the module imports, at file scope and through our own packages' file-scope imports, only the
    standard library, Slicer and what Slicer ships: a missing torch, MONAI or pyradiomics never stops the
    module from loading."""
    import sys

    todo, seen, foreign = [MODULE_PY, *(MODULE / "MSInstanceSaliencyMRML").glob("*.py")], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _file_scope_imports(path):
            top = module.split(".")[0]
            if top in OUR_PACKAGES:
                todo.extend(_our_files(module))
            elif top not in sys.stdlib_module_names and top not in SLICER_PROVIDED:
                foreign.add(f"{top} ({path.relative_to(ROOT)})")
    assert ROOT / "MSInstanceSaliencyLib" / "dependencies.py" in seen  # the walk follows our own packages
    assert not foreign, f"imported at file scope, not shipped with Slicer: {sorted(foreign)}"


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
    # Qt 5.15 (wrapped whole by PythonQt; listed so that a new call is looked up): qcombobox.h properties count,
    # currentIndex, currentText, public addItem(text, userData), findData, itemData and slot clear
    "QComboBox": QT_WIDGET | {"count", "currentIndex", "currentText", "addItem", "findData", "itemData", "clear"},
    # qabstractbutton.h property checked (the register-FLAIR box is enabled only with an MPRAGE)
    "QCheckBox": QT_WIDGET | {"checked"},
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


# Members Python may use on objects that are not .ui widgets, by the C++ class the object is, with where each
# comes from. qSlicer classes as the .ui widgets above (slots, Q_INVOKABLE, properties, signals); Qt classes
# are wrapped whole by PythonQt (public methods too).
OBJECT_CLASSES = {
    # slicer.app.extensionsManagerModel(): Q_INVOKABLE in Base/QTCore/qSlicerCoreApplication.h (v5.10.0, line 361),
    # only in a Slicer built with the Extensions Manager (#ifdef Slicer_BUILD_EXTENSIONMANAGER_SUPPORT): hasattr first
    "qSlicerExtensionsManagerModel": {
        # Base/QTCore/qSlicerExtensionsManagerModel.h, v5.10.0: Q_INVOKABLE isExtensionInstalled (line 176);
        # public slots downloadAndInstallExtensionByName (376) and updateExtensionsMetadataFromServer (432)
        "isExtensionInstalled", "downloadAndInstallExtensionByName", "updateExtensionsMetadataFromServer",
    },
    # slicer.util.createProgressDialog returns a QProgressDialog (Base/Python/slicer/util.py 3202-3230, v5.10.0):
    # Qt 5.15 qprogressdialog.h properties, slots and public methods, and QWidget's
    "QProgressDialog": {
        "wasCanceled", "minimum", "maximum", "value", "autoReset", "autoClose", "minimumDuration", "labelText",
        "cancel", "reset", "setMaximum", "setMinimum", "setRange", "setValue", "setLabelText", "setCancelButtonText",
        "setMinimumDuration", "setCancelButton", "show", "hide", "close", "setVisible", "windowTitle",
        "windowModality", "visible", "enabled",
    },
}
# calls whose result is an object of those classes
OBJECT_FACTORIES = {"extensionsManagerModel": "qSlicerExtensionsManagerModel", "createProgressDialog": "QProgressDialog",
                    "_installDialog": "QProgressDialog"}


def _object_member_uses():
    """(class, member) for every NAME.member where NAME was assigned from a call named in OBJECT_FACTORIES
    (also inside a conditional expression) in the same function."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))

    def factory_class(value):
        for n in ast.walk(value):
            if isinstance(n, ast.Call):
                name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                if name in OBJECT_FACTORIES:
                    return OBJECT_FACTORIES[name]
        return None

    uses = set()
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        aliases = {n.targets[0].id: factory_class(n.value) for n in ast.walk(func)
                   if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and factory_class(n.value)}
        uses |= {(aliases[n.value.id], n.attr) for n in ast.walk(func)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases}
    return uses


def test_calls_on_slicer_and_qt_objects_are_reachable_from_python():
    uses = _object_member_uses()
    assert ("qSlicerExtensionsManagerModel", "downloadAndInstallExtensionByName") in uses  # the walk sees the install
    assert ("QProgressDialog", "setCancelButton") in uses
    bad = sorted((cls, member) for cls, member in uses if member not in OBJECT_CLASSES[cls])
    assert not bad, f"not in the table of reachable calls (check the class's header, then add it with its source): {bad}"
    text = MODULE_PY.read_text(encoding="utf-8")
    # the model exists only in Slicer builds with the Extensions Manager
    assert 'hasattr(slicer.app, "extensionsManagerModel")' in text
    # installExtensionFromServer asks its own questions and restarts: the module asks once and uses the two steps
    assert ".installExtensionFromServer(" not in text
    # the install dialog stays until it is closed (Qt's autoClose/autoReset would hide it at 100 %)
    install_dialog = text[text.index("def _installDialog"):text.index("def ensureDependencies")]
    assert "autoClose=False" in install_dialog and "autoReset=False" in install_dialog


def test_dependency_install_is_guarded_and_uses_pip_ensure_where_it_exists():
    """One install at a time: ensureDependencies checks and sets the guard before anything else; Slicer 5.11+
    pip_ensure (Base/Python/slicer/packaging.py on main) installs MONAI there, pip --no-deps on 5.10."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MSInstanceSaliencyLogic")
    methods = {n.name: n for n in logic.body if isinstance(n, ast.FunctionDef)}
    for name in ("ensureDependencies", "offerRadiomicsExtension"):
        first, second = methods[name].body[1:3]  # after the docstring
        assert isinstance(first, ast.If) and "_claimInstall" in ast.unparse(first.test), name
        assert isinstance(second, ast.Try) and "_releaseInstall" in ast.unparse(second.finalbody), name
    install = ast.unparse(methods["installDependencies"])
    assert "hasattr(slicerPackaging, 'pip_ensure')" in install and "skip_packages=list(dependencies.KEEP_AS_INSTALLED)" in install
    assert "['--no-deps', requirement]" in install
    assert "torchVersionRequirement=dependencies.TORCH_REQUIREMENT" in install
