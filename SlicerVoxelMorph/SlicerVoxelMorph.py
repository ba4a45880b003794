"""SlicerVoxelMorph: learning-based deformable registration (VoxelMorph) as a 3D Slicer module.

The module is thin glue between the Slicer scene and the engine in ``SlicerVoxelMorphLib``; torch is
imported only when a registration runs.
"""

import enum
import logging
from pathlib import Path
from typing import Annotated, Union

import numpy as np
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Attribute that marks nodes this module created; only such nodes are reused or replaced by a re-run.
ROLE_ATTRIBUTE = "SlicerVoxelMorph.Role"
# torch builds before 2.3 were compiled against numpy 1.x; Slicer 5.10 ships numpy 2
TORCH_REQUIREMENT = ">=2.3"
TORCH_MINIMUM = (2, 3)


#
# SlicerVoxelMorph
#


class SlicerVoxelMorph(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoxelMorph Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # PyTorchUtils (SlicerPyTorch) is used when present, not required to load
        self.parent.contributors = ["SlicerVoxelMorph contributors (https://github.com/SlicerVoxelMorph)"]
        self.parent.helpText = _("""
Deformable registration of a moving volume to a fixed volume with a VoxelMorph network
(refined by instance optimisation: a few steps in Fast mode, more in Accurate mode) after an affine
pre-alignment. Requires Slicer 5.10 or later.
The bundled model was trained on adult brain MRI (LPBA40 T1, with images synthesised in other contrasts and
with skull): for other contrasts, scanners or anatomy use Accurate mode, which adapts the result to the pair.
Research use only: not a medical device.
Outputs: the warped volume on the fixed grid, a grid transform (resampling convention, fixed to moving)
that can be applied to any node, the Jacobian determinant of the deformation, and a Dice table when
label maps or segmentations are given (segments matched by name, label map values by value; overlapping
segments each get their own Dice). Optional: masks of the regions to align (to ignore skull, a lesion or
electrodes), landmark point lists (target registration error table), the inverse transform, and other
volumes or segmentations of the moving subject warped along.
See the <a href="https://github.com/SlicerVoxelMorph/SlicerVoxelMorph">module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Based on VoxelMorph (Balakrishnan et al., IEEE TMI 2019; Dalca et al., MICCAI 2018).
The bundled model was trained on the LPBA40 brain MRI atlas (LONI, UCLA).
Built on the 3D Slicer scripted module template.
""")


#
# Parameter node
#


class ModelSource(enum.Enum):
    BUNDLED = "bundled"
    FILE = "file"
    NONE = "none"

    def label(self) -> str:
        return {"bundled": _("Bundled (brain MRI, any contrast, skull on or off)"), "file": _("Model file"),
                "none": _("None (optimisation only)")}[self.value]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {"auto": _("Auto"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class Mode(enum.Enum):
    FAST = "fast"
    ACCURATE = "accurate"

    def label(self) -> str:
        return {"fast": _("Fast (network + a few refinement steps)"),
                "accurate": _("Accurate (network + refinement for this pair)")}[self.value]


@parameterNodeWrapper
class SlicerVoxelMorphParameterNode:
    """Everything the panel shows; saved with the scene."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
    movingLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
    warpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    computeJacobian: bool = True
    jacobianVolume: vtkMRMLScalarVolumeNode
    diceTable: vtkMRMLTableNode
    computeInverse: bool = False
    inverseTransform: vtkMRMLTransformNode
    fixedMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
    movingMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
    fixedLandmarks: Union[vtkMRMLMarkupsFiducialNode, None]  # noqa: UP007
    movingLandmarks: Union[vtkMRMLMarkupsFiducialNode, None]  # noqa: UP007
    landmarkTable: vtkMRMLTableNode
    smoothness: Annotated[float, WithinRange(0.25, 4.0)] = 1.0
    modelSource: ModelSource = ModelSource.BUNDLED
    modelPath: Path
    device: Device = Device.AUTO
    mode: Mode = Mode.FAST
    refineIterations: Annotated[int, WithinRange(1, 1000)] = 50
    affine: bool = True


#
# SlicerVoxelMorphWidget
#


class SlicerVoxelMorphWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: reads and writes the parameter node, runs the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._devicesDetected = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerVoxelMorph.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        import ctk

        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = ["PyTorch model (*.pt *.pth)", "All files (*)"]

        self.logic = SlicerVoxelMorphLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._devicesDetected and SlicerVoxelMorphLogic.torchInstalled():
            # after the panel is shown: importing torch takes a moment
            qt.QTimer.singleShot(0, self.onDetectDevices)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetAttribute(ROLE_ATTRIBUTE)]
            if len(volumes) >= 2:
                self._parameterNode.fixedVolume = volumes[0]
                self._parameterNode.movingVolume = volumes[1]

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets carry a "SlicerParameterName" dynamic property in the .ui file
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.modelPathLineEdit.enabled = p.modelSource == ModelSource.FILE
        self.ui.refineIterationsSpinBox.enabled = p.modelSource == ModelSource.NONE
        self.ui.smoothnessSliderWidget.enabled = self.logic.setsSmoothness(p)
        self.ui.landmarkTableSelector.enabled = p.fixedLandmarks is not None and p.movingLandmarks is not None
        self.ui.jacobianSelector.enabled = p.computeJacobian
        self.ui.inverseTransformSelector.enabled = p.computeInverse
        problem = self.logic.inputProblem(p) if not self._running else _("Registration is running")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Register the moving volume to the fixed volume")

    def onDetectDevices(self) -> None:
        """Show the devices torch can use (imports torch)."""
        if not SlicerVoxelMorphLogic.torchInstalled():
            self.ui.detectedDevicesLabel.text = _("PyTorch is not installed: it will be offered on Apply")
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not check the compute devices."), waitCursor=True):
                devices = self.logic.availableDevices()
        except Exception:  # shown in a message box already
            self.ui.detectedDevicesLabel.text = _("Device detection failed")
            return
        self._devicesDetected = True
        self.ui.detectedDevicesLabel.text = _("Detected: {devices}; Auto uses the {device}").format(
            devices=", ".join("GPU (CUDA)" if d == "cuda" else d.upper() for d in devices),
            device="GPU" if "cuda" in devices else "CPU")

    def _ensureTorch(self) -> bool:
        """True when torch can be imported, offering to install it through SlicerPyTorch otherwise."""
        if SlicerVoxelMorphLogic.torchInstalled():
            problem = SlicerVoxelMorphLogic.torchVersionProblem()
            if problem:
                slicer.util.errorDisplay(problem)
            return problem is None
        if not SlicerVoxelMorphLogic.pyTorchUtilsAvailable():
            slicer.util.errorDisplay(_("VoxelMorph registration needs PyTorch. Install the 'PyTorch' extension "
                                       "(SlicerPyTorch) from the Extensions Manager, restart Slicer and try again."))
            return False
        if not slicer.util.confirmOkCancelDisplay(
                _("VoxelMorph registration needs PyTorch, which is not installed yet.\n\nInstall it now with the "
                  "PyTorch extension? This downloads about 1 GB (more with GPU support) and takes a few minutes.")):
            return False
        try:
            with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
                installed = self.logic.installTorch()
        except Exception:  # shown in a message box already
            return False
        if not installed:
            slicer.util.errorDisplay(_("PyTorch was not installed."))
        return installed

    def onApplyButton(self) -> None:
        if not self._ensureTorch():
            return
        from SlicerVoxelMorphLib.errors import Cancelled
        from SlicerVoxelMorphLib.scene import ProgressTracker, summary_text

        p = self._parameterNode
        full = self.logic.refineSteps(p) > 0 or self.logic.accurate(p)  # else Fast mode's polish, now and then more
        tracker = ProgressTracker(affine=p.affine, refine="full" if full else "polish")
        dialog = slicer.util.createProgressDialog(windowTitle=_("VoxelMorph registration"),
                                                  labelText=_("Starting..."), maximum=100,
                                                  windowModality=qt.Qt.ApplicationModal, autoClose=False,
                                                  autoReset=False)  # stays up while the outputs are written
        self._running = True
        self._updateGui()

        def progress(stage: str, fraction: float) -> None:
            percent, text = tracker.update(stage, fraction)
            dialog.labelText = text
            dialog.value = percent
            self.ui.statusLabel.text = f"{text} ({percent} %)"
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise Cancelled("registration cancelled by the user")

        try:
            with slicer.util.tryWithErrorDisplay(_("Registration failed.")):
                try:
                    outputs = self.logic.processParameterNode(
                        p, progress=progress, alsoWarp=list(self.ui.alsoWarpCheckableComboBox.checkedNodes()))
                except Cancelled:
                    self.ui.statusLabel.text = _("Cancelled")
                    return
            self.ui.statusLabel.text = summary_text(outputs.report)
        except Exception as exc:  # already shown in a message box by tryWithErrorDisplay
            self.ui.statusLabel.text = _("Failed: {error}").format(error=str(exc).splitlines()[0] if str(exc) else
                                                                    type(exc).__name__)
            logging.exception("SlicerVoxelMorph registration failed")
        finally:
            dialog.close()
            self._running = False
            self._updateGui()


#
# SlicerVoxelMorphLogic
#


class RegistrationOutputs:
    """Nodes a registration wrote, and the engine's report."""

    def __init__(self, warped, transform, jacobian, table, chart, report: dict, inverse=None, landmarks=None,
                 alsoWarped=()) -> None:
        self.warpedVolume = warped
        self.landmarkTable = landmarks
        self.alsoWarped = list(alsoWarped)
        self.transform = transform
        self.inverseTransform = inverse
        self.jacobianVolume = jacobian
        self.diceTable = table
        self.chart = chart
        self.report = report


class SlicerVoxelMorphLogic(ScriptedLoadableModuleLogic):
    """Scene <-> engine. No GUI: usable from the Python console and from tests."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SlicerVoxelMorphParameterNode(super().getParameterNode())

    # --- environment -------------------------------------------------------------------------------

    @staticmethod
    def torchInstalled() -> bool:
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def torchVersionProblem() -> str | None:
        """Why the installed torch cannot run here (too old for Slicer's numpy 2), or None."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("torch")
        except PackageNotFoundError:
            return None
        numbers = tuple(int(part) for part in installed.split("+")[0].split(".")[:2] if part.isdigit())
        if numbers >= TORCH_MINIMUM:
            return None
        return _("PyTorch {installed} is installed, but {required} is needed with this Slicer: update it from the "
                 "PyTorch module (SlicerPyTorch) and restart Slicer.").format(installed=installed,
                                                                             required=TORCH_REQUIREMENT)

    @staticmethod
    def pyTorchUtilsAvailable() -> bool:
        try:
            import PyTorchUtils  # noqa: F401
        except ImportError:
            return False
        return True

    @staticmethod
    def installTorch() -> bool:
        """Install torch with SlicerPyTorch's PyTorchUtils (light-the-torch picks the CUDA build)."""
        import PyTorchUtils

        logic = PyTorchUtils.PyTorchUtilsLogic()
        return logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is not None

    @staticmethod
    def availableDevices() -> list[str]:
        from SlicerVoxelMorphLib.devices import available_devices

        return available_devices()

    # --- parameters --------------------------------------------------------------------------------

    @staticmethod
    def inputProblem(p) -> str | None:
        """Why Apply cannot run with these parameters, or None."""
        if not p.fixedVolume or not p.movingVolume:
            return _("Select a fixed and a moving volume")
        if p.fixedVolume == p.movingVolume:
            return _("The fixed and moving volumes must be different")
        if (p.fixedLabels is None) != (p.movingLabels is None):
            return _("Select labels for both volumes, or for neither")
        if p.modelSource == ModelSource.FILE and not Path(p.modelPath).is_file():
            return _("Select a model file")
        if (p.fixedLandmarks is None) != (p.movingLandmarks is None):
            return _("Select landmarks for both volumes, or for neither")
        inputs = {n.GetID() for n in (p.fixedVolume, p.movingVolume, p.fixedLabels, p.movingLabels) if n}
        for output in (p.warpedVolume, p.jacobianVolume):
            if output is not None and output.GetID() in inputs:
                return _("An output volume is one of the inputs: choose another or create a new one")
        if p.outputTransform is not None:
            for node in (p.fixedVolume, p.movingVolume, p.fixedLabels, p.movingLabels):
                parent = node.GetParentTransformNode() if node else None
                while parent is not None:
                    if parent.GetID() == p.outputTransform.GetID():
                        return _("The output transform is applied to an input: choose another or create a new one")
                    parent = parent.GetParentTransformNode()
        return None

    @staticmethod
    def modelArgument(p) -> str | None:
        if p.modelSource == ModelSource.BUNDLED:
            return "bundled"
        if p.modelSource == ModelSource.NONE:
            return None
        return str(p.modelPath)

    @staticmethod
    def refineSteps(p) -> int:
        """Refinement steps of the optimisation-only mode (Accurate mode with a model uses the preset)."""
        return int(p.refineIterations) if p.modelSource == ModelSource.NONE else 0

    @staticmethod
    def accurate(p) -> bool:
        return p.mode == Mode.ACCURATE and p.modelSource != ModelSource.NONE

    @staticmethod
    def setsSmoothness(p) -> bool:
        """Whether the panel's Smoothness applies (its slider is enabled): Accurate mode and optimisation only."""
        return p.mode == Mode.ACCURATE or p.modelSource == ModelSource.NONE

    @classmethod
    def smoothness(cls, p) -> float:
        """The Smoothness the registration uses: the panel's where it applies, else the default (Fast mode's
        polish and safety net keep their presets, whatever a disabled slider still holds)."""
        return float(p.smoothness) if cls.setsSmoothness(p) else 1.0

    def processParameterNode(self, p, progress=None, alsoWarp=()) -> RegistrationOutputs:
        """Run with the panel's settings and store the created output nodes back in the parameter node;
        ``alsoWarp``: more volumes and segmentations of the moving subject to bring onto the fixed grid."""
        problem = self.inputProblem(p)
        if problem:
            raise ValueError(problem)
        outputs = self.process(
            p.fixedVolume, p.movingVolume, p.fixedLabels, p.movingLabels,
            warpedVolume=p.warpedVolume, transform=p.outputTransform,
            jacobianVolume=p.jacobianVolume if p.computeJacobian else None, computeJacobian=p.computeJacobian,
            diceTable=p.diceTable, inverseTransform=p.inverseTransform, computeInverse=p.computeInverse,
            fixedMask=p.fixedMask, movingMask=p.movingMask, fixedLandmarks=p.fixedLandmarks,
            movingLandmarks=p.movingLandmarks, landmarkTable=p.landmarkTable, smoothness=self.smoothness(p),
            alsoWarp=alsoWarp, model=self.modelArgument(p), device=p.device.value,
            refineSteps=self.refineSteps(p), accurate=self.accurate(p), affine=p.affine, progress=progress)
        p.warpedVolume = outputs.warpedVolume
        p.outputTransform = outputs.transform
        if outputs.jacobianVolume is not None:
            p.jacobianVolume = outputs.jacobianVolume
        if outputs.diceTable is not None:
            p.diceTable = outputs.diceTable
        if outputs.inverseTransform is not None:
            p.inverseTransform = outputs.inverseTransform
        if outputs.landmarkTable is not None:
            p.landmarkTable = outputs.landmarkTable
        return outputs

    # --- the run -----------------------------------------------------------------------------------

    def process(self, fixedVolume, movingVolume, fixedLabels=None, movingLabels=None, *, warpedVolume=None,
                transform=None, jacobianVolume=None, computeJacobian=True, diceTable=None, inverseTransform=None,
                computeInverse=False, fixedMask=None, movingMask=None, fixedLandmarks=None, movingLandmarks=None,
                landmarkTable=None, smoothness=1.0, alsoWarp=(), model="bundled",
                device="auto", refineSteps=0, accurate=False, affine=True, progress=None,
                showResult=True) -> RegistrationOutputs:
        """Register ``movingVolume`` to ``fixedVolume`` and write the results into the scene.

        Output nodes that are None are created (and marked as the module's own). Label inputs are label map
        volumes or segmentations; both or neither (overlapping segments get Dice from separate masks). Masks
        (label map or segmentation) hide what is outside them; landmarks (point lists, matched by label or
        order) give a TRE table; ``alsoWarp`` volumes and segmentations of the moving subject are brought
        onto the fixed grid. Raises ValueError (InputError) for bad input and
        SlicerVoxelMorphLib.errors.Cancelled when ``progress`` cancels.
        """
        from SlicerVoxelMorphLib import scene
        from SlicerVoxelMorphLib.register import register  # imports torch

        if fixedVolume is None or movingVolume is None:
            raise ValueError(_("A fixed and a moving volume are required"))
        if (fixedLabels is None) != (movingLabels is None):
            raise ValueError(_("Give labels for both volumes, or for neither"))
        if (fixedLandmarks is None) != (movingLandmarks is None):
            raise ValueError(_("Give landmarks for both volumes, or for neither"))
        inputIds = {n.GetID() for n in (fixedVolume, movingVolume, fixedLabels, movingLabels) if n is not None}
        if any(output is not None and output.GetID() in inputIds for output in (warpedVolume, jacobianVolume)):
            raise ValueError(_("An output volume is one of the inputs: choose another or create a new one"))
        if computeInverse and transform is not None and inverseTransform is not None \
                and transform.GetID() == inverseTransform.GetID():
            raise ValueError(_("The transform and the inverse transform must be different nodes"))

        fixed = self.imageFromVolume(fixedVolume)
        moving = self.imageFromVolume(movingVolume)
        arguments = {}
        overlapping = None
        if fixedLabels is not None:
            labels = self.labelImages(fixedLabels, fixedVolume, fixed, movingLabels, movingVolume, moving)
            overlapping = labels.pop("overlapping", None)
            arguments.update(labels)
        if fixedMask is not None:
            arguments["fixed_mask"] = self.maskImage(fixedMask, fixedVolume)
        if movingMask is not None:
            arguments["moving_mask"] = self.maskImage(movingMask, movingVolume)
        landmarkNames = []
        if fixedLandmarks is not None:
            fixedPoints, movingPoints, landmarkNames = scene.match_landmarks(
                self.controlPoints(fixedLandmarks), self.controlPoints(movingLandmarks))
            arguments.update(fixed_points=fixedPoints, moving_points=movingPoints)

        result = register(fixed, moving, model=model, device=device, refine_steps=int(refineSteps),
                          accurate=bool(accurate), affine=bool(affine), inverse=bool(computeInverse),
                          smoothness=float(smoothness), progress=progress, **arguments)
        if overlapping is not None:  # segments overlap: one Dice per segment from its own masks
            result.report.update(scene.mask_dice_report(*overlapping[:2], result.displacement, fixed, overlapping[2]))

        warped = self.writeVolume(warpedVolume, result.warped, movingVolume.GetName() + " warped", "warped")
        gridTransform = self.writeGridTransform(transform, result.displacement,
                                                movingVolume.GetName() + " VoxelMorph transform")
        gridTransform.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(),
                                         movingVolume.GetID())
        gridTransform.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(),
                                         fixedVolume.GetID())
        inverse = None
        if result.inverse_displacement is not None:
            inverse = self.writeGridTransform(inverseTransform, result.inverse_displacement,
                                              movingVolume.GetName() + " VoxelMorph inverse transform", "inverse")
            # the inverse maps the fixed volume onto the moving one: the roles swap
            inverse.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), fixedVolume.GetID())
            inverse.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), movingVolume.GetID())
        jacobian = None
        if computeJacobian:
            jacobian = self.writeVolume(jacobianVolume, result.jacobian, movingVolume.GetName() + " Jacobian",
                                        "jacobian")
            self.showJacobianColors(jacobian)
        table = chart = None
        if result.report.get("labels"):
            table = self.writeDiceTable(diceTable, result.report)
            chart = self.diceChart(table)
        landmarks = None
        if result.report.get("landmarks"):
            landmarks = self.writeTable(landmarkTable, "VoxelMorph landmarks", "landmark table",
                                        scene.LANDMARK_COLUMNS, scene.landmark_table_rows(result.report, landmarkNames))
        alsoWarped = [self.warpAlong(node, movingVolume, fixedVolume, fixed, result.displacement)
                      for node in alsoWarp if node is not None and node.GetID() not in
                      {movingVolume.GetID(), warped.GetID()}]

        if showResult:
            slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=warped, foregroundOpacity=0.5,
                                             fit=True)
            if table is not None:
                self.showTableAndChart(table, chart)
        logging.info(f"SlicerVoxelMorph: {result.report.get('seconds', {})}")
        return RegistrationOutputs(warped, gridTransform, jacobian, table, chart, result.report, inverse, landmarks,
                                   alsoWarped)

    # --- scene -> engine ---------------------------------------------------------------------------

    @staticmethod
    def worldIJKToRAS(volumeNode) -> np.ndarray:
        """IJKToRAS of a volume in world coordinates (through a linear parent transform, if any)."""
        from SlicerVoxelMorphLib import images

        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        parentToWorld = None
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise ValueError(_("{name} is under a non-linear transform: harden it first").format(
                    name=volumeNode.GetName()))
            toWorld = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(toWorld)
            parentToWorld = slicer.util.arrayFromVTKMatrix(toWorld)
        return images.world_ijk_to_ras(slicer.util.arrayFromVTKMatrix(matrix), parentToWorld)

    def imageFromVolume(self, volumeNode):
        """SimpleITK image (LPS) with the volume's voxels and world geometry."""
        from SlicerVoxelMorphLib import images

        if volumeNode.GetImageData() is None:
            raise ValueError(_("{name} has no image data").format(name=volumeNode.GetName()))
        return images.image_from_array(slicer.util.arrayFromVolume(volumeNode), self.worldIJKToRAS(volumeNode))

    @staticmethod
    def labelNames(labelsNode) -> dict[int, str]:
        """{label value: name}: segments get values 1, 2, ... in segment order; label maps use the
        values present, named "value: name" from their colour table unless it is one of Slicer's
        default tables, whose entry names are not structures."""
        from SlicerVoxelMorphLib import scene

        if labelsNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = labelsNode.GetSegmentation()
            return {index + 1: segmentation.GetSegment(segmentation.GetNthSegmentID(index)).GetName()
                    for index in range(segmentation.GetNumberOfSegments())}
        values = [int(v) for v in np.unique(slicer.util.arrayFromVolume(labelsNode)) if v != 0]
        display = labelsNode.GetDisplayNode()
        colors = display.GetColorNode() if display is not None else None
        table = colors.GetName() if colors is not None else None
        return {value: scene.structure_name(
            value, colors.GetColorName(value) if colors is not None and value < colors.GetNumberOfColors() else None,
            table) for value in values}

    def labelArray(self, labelsNode, volumeImage) -> np.ndarray:
        """A label map volume's values (K, J, I) on the grid of ``volumeImage`` (nearest neighbour)."""
        from SlicerVoxelMorphLib import images

        labels = images.image_from_array(slicer.util.arrayFromVolume(labelsNode), self.worldIJKToRAS(labelsNode))
        return images.array_kji(images.labels_on_grid(labels, volumeImage))

    def structureMasks(self, labelsNode, volumeNode, volumeImage, values: list[int]) -> list[np.ndarray]:
        """One boolean (K, J, I) array per value on the volume's grid: a segment (value = index + 1),
        exported on its own so that overlapping segments keep their overlap, or a label map value."""
        if labelsNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = labelsNode.GetSegmentation()
            # exports through ExportSegmentsToLabelmapNode onto the volume's grid (and parent transform)
            return [slicer.util.arrayFromSegmentBinaryLabelmap(labelsNode, segmentation.GetNthSegmentID(value - 1),
                                                               volumeNode) > 0 for value in values]
        array = self.labelArray(labelsNode, volumeImage)
        return [array == value for value in values]

    def labelImages(self, fixedLabels, fixedVolume, fixed, movingLabels, movingVolume, moving) -> dict:
        """Engine label arguments: both label maps renumbered 1..n over the structures they share; with
        overlapping segments instead "overlapping": (fixed masks, moving mask images, names). Label maps
        become masks only in that case (one mask per structure costs a volume of memory each)."""
        from SlicerVoxelMorphLib import images, scene

        byValue = fixedLabels.IsA("vtkMRMLLabelMapVolumeNode") and movingLabels.IsA("vtkMRMLLabelMapVolumeNode")
        pairs = scene.pair_labels(self.labelNames(fixedLabels), self.labelNames(movingLabels), byValue)
        if not pairs:
            raise ValueError(_("The fixed and moving labels share no structure (segments are matched by name, "
                               "label map values by value)"))
        names = [name for _f, _m, name in pairs]
        sides = [(fixedLabels, fixedVolume, fixed, [f for f, _m, _n in pairs]),
                 (movingLabels, movingVolume, moving, [m for _f, m, _n in pairs])]
        segmentMasks = [self.structureMasks(*side) if side[0].IsA("vtkMRMLSegmentationNode") else None
                        for side in sides]
        movingMatrix = self.worldIJKToRAS(movingVolume)
        if any(masks is not None and scene.masks_overlap(masks) for masks in segmentMasks):
            fixedMasks, movingMasks = (masks if masks is not None else self.structureMasks(*side)
                                       for masks, side in zip(segmentMasks, sides, strict=True))
            return {"overlapping": (fixedMasks, [images.image_from_array(mask.astype(np.uint8), movingMatrix)
                                                 for mask in movingMasks], names)}
        arrays = [scene.merge_masks(masks) if masks is not None else
                  scene.relabel(self.labelArray(node, image), {value: k + 1 for k, value in enumerate(values)})
                  for masks, (node, _volume, image, values) in zip(segmentMasks, sides, strict=True)]
        return {
            "fixed_labels": images.image_from_array(arrays[0], self.worldIJKToRAS(fixedVolume)),
            "moving_labels": images.image_from_array(arrays[1], movingMatrix),
            "label_names": {k + 1: name for k, name in enumerate(names)},
        }

    def maskImage(self, maskNode, volumeNode):
        """Binary image on the volume's grid: non-zero label map voxels, or the union of all segments."""
        from SlicerVoxelMorphLib import images

        if maskNode.IsA("vtkMRMLSegmentationNode"):
            count = maskNode.GetSegmentation().GetNumberOfSegments()
            if count == 0:
                raise ValueError(_("The mask {name} has no segment").format(name=maskNode.GetName()))
            masks = self.structureMasks(maskNode, volumeNode, None, list(range(1, count + 1)))
            inside = np.logical_or.reduce(masks)
        else:
            inside = self.labelArray(maskNode, self.imageFromVolume(volumeNode)) != 0
        return images.image_from_array(inside.astype(np.uint8), self.worldIJKToRAS(volumeNode))

    @staticmethod
    def controlPoints(markupsNode) -> list[tuple[str, np.ndarray]]:
        """(label, world RAS position) of every control point of a point list."""
        positions = slicer.util.arrayFromMarkupsControlPoints(markupsNode, world=True)
        placed = slicer.vtkMRMLMarkupsNode.PositionDefined  # unplaced (preview, missing) points have no position
        return [(markupsNode.GetNthControlPointLabel(index), positions[index]) for index in range(len(positions))
                if markupsNode.GetNthControlPointPositionStatus(index) == placed]

    # --- engine -> scene ---------------------------------------------------------------------------

    @staticmethod
    def ownNode(node, className: str, name: str, role: str):
        """``node`` if given, otherwise a new node marked as created by this module."""
        if node is not None:
            return node
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        return node

    def writeVolume(self, volumeNode, image, name: str, role: str, className: str = "vtkMRMLScalarVolumeNode"):
        """Volume with the image's voxels and geometry (updateVolumeFromArray sets no geometry)."""
        from SlicerVoxelMorphLib import images

        volumeNode = self.ownNode(volumeNode, className, name, role)
        volumeNode.SetAndObserveTransformNodeID(None)  # the geometry below is already in world coordinates
        slicer.util.updateVolumeFromArray(volumeNode, images.array_kji(image))
        volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(images.ijk_to_ras(image)))
        volumeNode.CreateDefaultDisplayNodes()
        return volumeNode

    def writeGridTransform(self, transformNode, displacement, name: str, role: str = "transform"):
        """Grid transform node, FromParent (resampling convention: a point x of the displacement's grid
        -> x + u(x)); the grid is filled before it is attached, so a re-run refreshes the display."""
        from vtk.util.numpy_support import vtk_to_numpy

        from SlicerVoxelMorphLib import scene

        grid = scene.grid_transform_arrays(displacement)
        transformNode = self.ownNode(transformNode, "vtkMRMLTransformNode", name, role)
        transformNode.SetAndObserveTransformNodeID(None)  # the grid is in world coordinates
        gridImage = vtk.vtkImageData()
        gridImage.SetOrigin(*grid.origin_ras)
        gridImage.SetSpacing(*grid.spacing)
        gridImage.SetDimensions(*grid.dimensions)
        gridImage.AllocateScalars(vtk.VTK_DOUBLE, 3)
        vtk_to_numpy(gridImage.GetPointData().GetScalars())[:] = grid.vectors_ras.reshape(-1, 3)  # i fastest
        direction = np.eye(4)
        direction[:3, :3] = grid.direction_ras
        gridTransform = slicer.vtkOrientedGridTransform()
        gridTransform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
        gridTransform.SetDisplacementGridData(gridImage)
        transformNode.SetAndObserveTransformFromParent(gridTransform)

        transformNode.CreateDefaultDisplayNodes()
        display = transformNode.GetDisplayNode()
        display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
        display.SetVisibility(1)
        display.SetVisibility2D(1)
        display.SetVisibility3D(0)
        return transformNode

    @staticmethod
    def showJacobianColors(volumeNode) -> None:
        """Diverging colours centred on 1 (no volume change): blue shrinks, red expands."""
        display = volumeNode.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileDivergingBlueRed.txt")
        display.SetAutoWindowLevel(0)
        display.SetWindowLevelMinMax(0.0, 2.0)

    def writeDiceTable(self, tableNode, report: dict):
        """Table: structure name, Dice before, Dice after, fixed volume (mm3), one row per label."""
        from SlicerVoxelMorphLib import scene

        tableNode = self.writeTable(tableNode, "VoxelMorph Dice", "dice table", scene.DICE_COLUMNS,
                                    scene.dice_table_rows(report))
        tableNode.SetColumnUnitLabel(scene.DICE_COLUMNS[3], "mm3")
        return tableNode

    def writeTable(self, tableNode, name: str, role: str, columns: tuple[str, ...], rows: list[tuple]):
        """Table with a text first column and numeric others, one row per tuple."""
        tableNode = self.ownNode(tableNode, "vtkMRMLTableNode", name, role)
        tableNode.RemoveAllColumns()
        names = vtk.vtkStringArray()
        names.SetName(columns[0])
        arrays = [names]
        for title in columns[1:]:
            column = vtk.vtkDoubleArray()
            column.SetName(title)
            arrays.append(column)
        for row in rows:
            names.InsertNextValue(row[0])
            for column, value in zip(arrays[1:], row[1:], strict=True):
                column.InsertNextValue(value)
        for column in arrays:
            tableNode.AddColumn(column)
        tableNode.Modified()
        return tableNode

    def warpAlong(self, node, movingVolume, fixedVolume, fixed, displacement):
        """A volume or segmentation of the moving subject on the fixed grid through the result, as a new node:
        label maps by nearest neighbour (colours kept), volumes linearly, segments as smooth masks."""
        from SlicerVoxelMorphLib import apply, images, scene

        name = node.GetName() + " warped"
        if node.IsA("vtkMRMLSegmentationNode"):
            out = self.ownNode(None, "vtkMRMLSegmentationNode", name, "also warped")
            out.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
            out.CreateDefaultDisplayNodes()
            segmentation = node.GetSegmentation()
            movingMatrix = self.worldIJKToRAS(movingVolume)
            transform = images.field_transform(displacement)  # built once for all segments
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                segment = segmentation.GetSegment(segmentId)
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, movingVolume)
                moved = scene.warp_mask(images.image_from_array(mask.astype(np.uint8), movingMatrix), transform,
                                        fixed)
                newId = out.GetSegmentation().AddEmptySegment("", segment.GetName(), segment.GetColor())
                slicer.util.updateSegmentBinaryLabelmapFromArray(moved.astype(np.uint8), out, newId, fixedVolume)
            return out
        isLabelMap = node.IsA("vtkMRMLLabelMapVolumeNode")
        moved = apply.warp_image(self.imageFromVolume(node), displacement, fixed,
                                 "nearest" if isLabelMap else "linear", labels=isLabelMap)
        out = self.writeVolume(None, moved, name, "also warped",
                               "vtkMRMLLabelMapVolumeNode" if isLabelMap else "vtkMRMLScalarVolumeNode")
        display = node.GetDisplayNode() if isLabelMap else None
        if display is not None and display.GetColorNodeID():
            out.GetDisplayNode().SetAndObserveColorNodeID(display.GetColorNodeID())
        return out

    @staticmethod
    def _ownedNode(className: str, role: str, tableNode):
        """This module's node of ``role`` that belongs to ``tableNode`` (by reference), or None."""
        for node in slicer.util.getNodesByClass(className):
            if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetNodeReferenceID("diceTable") == tableNode.GetID():
                return node
        return None

    def diceChart(self, tableNode):
        """Bar chart of Dice before / after per structure; reuses this module's chart for the table."""
        from SlicerVoxelMorphLib import scene

        chart = self._ownedNode("vtkMRMLPlotChartNode", "dice chart", tableNode)
        if chart is None:
            chart = self.ownNode(None, "vtkMRMLPlotChartNode", "VoxelMorph Dice chart", "dice chart")
            chart.SetNodeReferenceID("diceTable", tableNode.GetID())
        chart.RemoveAllPlotSeriesNodeIDs()
        for column, color in zip(scene.DICE_COLUMNS[1:3], ((0.6, 0.6, 0.6), (0.1, 0.45, 0.8)), strict=True):
            role = "dice series " + column
            series = self._ownedNode("vtkMRMLPlotSeriesNode", role, tableNode)
            if series is None:
                series = self.ownNode(None, "vtkMRMLPlotSeriesNode", column, role)
                series.SetNodeReferenceID("diceTable", tableNode.GetID())
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
            series.SetLabelColumnName(scene.DICE_COLUMNS[0])
            series.SetYColumnName(column)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle("Dice per structure")
        chart.SetYAxisTitle("Dice")
        chart.SetYAxisRangeAuto(False)
        chart.SetYAxisRange(0.0, 1.0)
        return chart

    @staticmethod
    def showTableAndChart(tableNode, chartNode) -> None:
        """Switch to the four-up + plot + table layout and show the Dice table and chart."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
        applicationLogic.PropagateTableSelection()
        slicer.modules.plots.logic().ShowChartInLayout(chartNode)


#
# SlicerVoxelMorphTest
#


class SlicerVoxelMorphTest(ScriptedLoadableModuleTest):
    """End-to-end test on Slicer sample data; skipped (nothing installed) when torch is missing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not SlicerVoxelMorphLogic.torchInstalled():
            self.delayDisplay("PyTorch is not installed: the VoxelMorph self-test is skipped (install the PyTorch "
                              "extension to run it)")
            return
        self.setUp()
        self.test_RegisterWithLabelMaps()
        self.setUp()
        self.test_SegmentationMatchedByName()
        self.setUp()
        self.test_MasksLandmarksOverlapAndAlsoWarp()

    @staticmethod
    def _thresholdLabels(volumeNode, name: str):
        """Label map on the volume's grid: 1 = brighter than the 60th percentile of the head,
        2 = brighter than the 90th percentile."""
        array = slicer.util.arrayFromVolume(volumeNode)
        head = array[array > np.percentile(array, 30)]
        labels = np.zeros(array.shape, np.uint8)
        labels[array > np.percentile(head, 60)] = 1
        labels[array > np.percentile(head, 90)] = 2
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.addVolumeFromArray(labels, matrix, name, "vtkMRMLLabelMapVolumeNode")

    def _inputs(self):
        import SampleData

        fixed = SampleData.downloadSample("MRBrainTumor1")
        moving = SampleData.downloadSample("MRBrainTumor2")
        self.assertIsNotNone(fixed)
        self.assertIsNotNone(moving)
        return fixed, moving

    @staticmethod
    def _sample(volumeNode, pointsRas: np.ndarray) -> np.ndarray:
        """Nearest-voxel values of a volume at RAS points (NaN outside)."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(matrix)
        rasToIjk = slicer.util.arrayFromVTKMatrix(matrix)
        ijk = np.rint(pointsRas @ rasToIjk[:3, :3].T + rasToIjk[:3, 3]).astype(int)
        array = slicer.util.arrayFromVolume(volumeNode)
        size = np.array(array.shape[::-1])
        inside = np.all((ijk >= 0) & (ijk < size), axis=1)
        values = np.full(len(pointsRas), np.nan)
        values[inside] = array[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
        return values

    def test_RegisterWithLabelMaps(self):
        self.delayDisplay("Loading sample data")
        fixed, moving = self._inputs()
        fixedLabels = self._thresholdLabels(fixed, "fixed labels")
        movingLabels = self._thresholdLabels(moving, "moving labels")

        logic = SlicerVoxelMorphLogic()
        stages = []
        outputs = logic.process(fixed, moving, fixedLabels, movingLabels, model="bundled", device="auto",
                                accurate=True, computeInverse=True, affine=True,
                                progress=lambda stage, fraction: stages.append(stage))
        self.delayDisplay("Registration done")
        self.assertIn("network", stages)
        self.assertIn("refine", stages)

        # inverse transform: on the moving grid, and forward then inverse returns points (within 0.5 mm)
        inverse = outputs.inverseTransform
        self.assertTrue(inverse.GetTransformFromParent().IsA("vtkOrientedGridTransform"))
        self.assertEqual(slicer.util.arrayFromGridTransform(inverse).shape[:3],
                         slicer.util.arrayFromVolume(moving).shape)
        forward, backward = outputs.transform.GetTransformFromParent(), inverse.GetTransformFromParent()
        centre = logic.worldIJKToRAS(fixed) @ np.append((np.array(fixed.GetImageData().GetDimensions()) - 1) / 2, 1)
        for offset in ([0, 0, 0], [10, -8, 5], [-12, 6, -4]):
            point = centre[:3] + offset
            back = np.array(backward.TransformPoint(forward.TransformPoint(point)))
            self.assertLess(np.linalg.norm(back - point), 0.5)

        # warped volume: on the fixed grid
        warped = outputs.warpedVolume
        self.assertEqual(warped.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        np.testing.assert_allclose(logic.worldIJKToRAS(warped), logic.worldIJKToRAS(fixed), atol=1e-4)
        self.assertEqual(warped.GetAttribute(ROLE_ATTRIBUTE), "warped")

        # grid transform: FromParent, on the fixed grid
        transform = outputs.transform
        self.assertTrue(transform.GetTransformFromParent().IsA("vtkOrientedGridTransform"))
        grid = slicer.util.arrayFromGridTransform(transform)
        self.assertEqual(grid.shape[:3], slicer.util.arrayFromVolume(fixed).shape)
        self.assertGreater(np.abs(grid).max(), 0.1)

        # direction: the moving volume hardened under the transform looks like the warped volume
        hardened = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, moving, "moving hardened")
        hardened.SetAndObserveTransformNodeID(transform.GetID())
        self.assertTrue(hardened.HardenTransform())
        dims = np.array(fixed.GetImageData().GetDimensions())
        rng = np.random.default_rng(0)
        ijk = rng.uniform(0.2, 0.8, size=(4000, 3)) * (dims - 1)
        fixedIjkToRas = logic.worldIJKToRAS(fixed)
        points = ijk @ fixedIjkToRas[:3, :3].T + fixedIjkToRas[:3, 3]
        a, b, m = self._sample(warped, points), self._sample(hardened, points), self._sample(moving, points)
        ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(m) & (a > 0)
        self.assertGreater(ok.sum(), 1000)
        hardenedCorrelation = np.corrcoef(a[ok], b[ok])[0, 1]
        movingCorrelation = np.corrcoef(a[ok], m[ok])[0, 1]
        self.delayDisplay(f"correlation warped~hardened {hardenedCorrelation:.3f}, warped~moving "
                          f"{movingCorrelation:.3f}")
        self.assertGreater(hardenedCorrelation, 0.9)
        # a transform applied the wrong way round would match the warped volume worse than the moving one
        self.assertGreaterEqual(hardenedCorrelation, movingCorrelation - 0.01)

        # Jacobian and Dice table
        self.assertIsNotNone(outputs.jacobianVolume)
        jacobian = slicer.util.arrayFromVolume(outputs.jacobianVolume)
        self.assertGreater(np.median(jacobian), 0.5)
        table = outputs.diceTable
        self.assertEqual(table.GetNumberOfRows(), len(outputs.report["labels"]))
        self.assertEqual(table.GetNumberOfRows(), 2)
        for row, entry in enumerate(outputs.report["labels"]):
            self.assertEqual(table.GetCellText(row, 0), entry["name"])
            self.assertAlmostEqual(float(table.GetCellText(row, 1)), entry["dice_before"], places=3)
            self.assertAlmostEqual(float(table.GetCellText(row, 2)), entry["dice_after"], places=3)
        self.assertGreaterEqual(outputs.report["mean_dice_after"], outputs.report["mean_dice_before"] - 0.05)

        # a re-run into the same outputs reuses them and creates no new chart
        charts = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode")
        again = logic.process(fixed, moving, fixedLabels, movingLabels, warpedVolume=warped, transform=transform,
                              jacobianVolume=outputs.jacobianVolume, diceTable=table, model="bundled",
                              refineSteps=0, affine=False, showResult=False)
        self.assertIs(again.warpedVolume, warped)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode"), charts)
        self.delayDisplay("Test passed")

    def test_SegmentationMatchedByName(self):
        self.delayDisplay("Segmentation against label map, matched by name")
        fixed, moving = self._inputs()
        fixedLabels = self._thresholdLabels(fixed, "fixed labels")
        movingLabels = self._thresholdLabels(moving, "moving labels")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segmentation")
        self.assertTrue(slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(movingLabels,
                                                                                                segmentation))
        labelNames = SlicerVoxelMorphLogic.labelNames(fixedLabels)
        # the default "Labels" table names values "jake", "Peach": the module calls them "label 1", "label 2"
        self.assertEqual(sorted(labelNames.values()), ["label 1", "label 2"])
        for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):  # imported in value order
            segmentation.GetSegmentation().GetNthSegment(index).SetName(f"label {index + 1}")
        segmentNames = list(SlicerVoxelMorphLogic.labelNames(segmentation).values())
        # reverse the segment order: matching must follow names, not export order
        segments = segmentation.GetSegmentation()
        firstId = segments.GetNthSegmentID(0)
        segments.SetSegmentIndex(firstId, segments.GetNumberOfSegments() - 1)

        logic = SlicerVoxelMorphLogic()
        settings = {"model": None, "device": "auto", "refineSteps": 1, "affine": False, "computeJacobian": False,
                    "showResult": False}
        byName = logic.process(fixed, moving, fixedLabels, segmentation, **settings)
        byValue = logic.process(fixed, moving, fixedLabels, movingLabels, **settings)
        self.assertIsNone(byName.jacobianVolume)
        names = [entry["name"] for entry in byName.report["labels"]]
        self.assertEqual(sorted(names), sorted(set(segmentNames) & set(labelNames.values())))
        self.assertEqual(len(names), 2)
        # Dice before registration does not depend on the registration: the same structures give the same
        # overlap whether matched by value (label maps) or by name (segments in another order)
        expected = {entry["name"]: entry["dice_before"] for entry in byValue.report["labels"]}
        for entry in byName.report["labels"]:
            self.assertAlmostEqual(entry["dice_before"], expected[entry["name"]], places=3)
        self.delayDisplay("Test passed")

    def test_MasksLandmarksOverlapAndAlsoWarp(self):
        self.delayDisplay("Masks, landmarks, overlapping segments, also-warp outputs")
        fixed, moving = self._inputs()
        fixedLabels = self._thresholdLabels(fixed, "fixed labels")
        movingLabels = self._thresholdLabels(moving, "moving labels")
        segmentations = []
        for labels, name in ((fixedLabels, "fixed segments"), (movingLabels, "moving segments")):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.SetReferenceImageGeometryParameterFromVolumeNode(labels)
            array = slicer.util.arrayFromVolume(labels)
            for segmentName, mask in (("head", array > 0), ("bright", array == 2)):  # "bright" lies inside "head"
                segmentId = node.GetSegmentation().AddEmptySegment("", segmentName)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segmentId, labels)
            segmentations.append(node)
        ijkToRas = SlicerVoxelMorphLogic.worldIJKToRAS(fixed)
        dims = np.array(fixed.GetImageData().GetDimensions())
        pointLists = []
        for name in ("fixed points", "moving points"):  # the same positions: TRE before registration is 0
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            for n, fraction in enumerate(([0.5, 0.5, 0.5], [0.4, 0.6, 0.5], [0.6, 0.45, 0.55])):
                ras = ijkToRas @ np.append(np.array(fraction) * (dims - 1), 1.0)
                points.AddControlPoint(ras[:3].tolist(), f"P{n + 1}")
            pointLists.append(points)

        logic = SlicerVoxelMorphLogic()
        outputs = logic.process(fixed, moving, segmentations[0], segmentations[1], fixedMask=fixedLabels,
                                movingMask=movingLabels, fixedLandmarks=pointLists[0], movingLandmarks=pointLists[1],
                                alsoWarp=[movingLabels, segmentations[1]], model="bundled", showResult=False)
        rows = {entry["name"]: entry for entry in outputs.report["labels"]}
        self.assertEqual(sorted(rows), ["bright", "head"])  # one row per segment: the overlap is kept
        self.assertGreater(rows["head"]["fixed_volume_mm3"], rows["bright"]["fixed_volume_mm3"])

        table = outputs.landmarkTable
        self.assertEqual(table.GetNumberOfRows(), 4)  # three pairs and the mean
        self.assertEqual(table.GetCellText(0, 0), "P1")
        self.assertAlmostEqual(float(table.GetCellText(0, 1)), 0.0, places=3)
        self.assertEqual(outputs.report["landmarks"]["tre_before_mm"], [0.0, 0.0, 0.0])

        warpedLabels, warpedSegments = outputs.alsoWarped
        self.assertTrue(warpedLabels.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertEqual(warpedLabels.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertEqual(warpedSegments.GetSegmentation().GetNumberOfSegments(), 2)
        # the warped "bright" segment and the warped label 2 are the same structure through the same field
        bright = slicer.util.arrayFromSegmentBinaryLabelmap(
            warpedSegments, warpedSegments.GetSegmentation().GetSegmentIdBySegmentName("bright"), fixed) > 0
        labelTwo = slicer.util.arrayFromVolume(warpedLabels) == 2
        # (linear >= 0.5 for segments, nearest neighbour for label maps: thin structures differ a little)
        self.assertGreater(2 * (bright & labelTwo).sum() / (bright.sum() + labelTwo.sum()), 0.8)
        self.delayDisplay("Test passed")
