"""SlicerVoxelMorph engine: VoxelMorph deformable registration of 3D images.

Plain Python (torch, numpy, SimpleITK); never imports slicer, qt, ctk or vtk.
"""

__version__ = "0.1.0"
