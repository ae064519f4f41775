"""Tensors between numpy and Triton's Python backend, shared by the model files here.

Through DLPack: the stub bundled with Triton 2.51 (nvidia-pytriton) misreads tensors in as_numpy()
and Tensor(name, array) under numpy 2. Imported only inside the backend (`triton_python_backend_utils`
exists nowhere else).
"""

import ctypes

import numpy as np
import triton_python_backend_utils as pb_utils

# A consumer of a DLPack capsule renames it "used_dltensor" (the DLPack protocol), so that the
# producer's destructor leaves the data to the consumer. The Python backend's Tensor.from_dlpack
# (2.51 and later) renames it "used_dlpack": numpy's destructor then finds neither name and reports
# an unraisable ValueError with a traceback, once per tensor. The name is set right after the call,
# and only on a capsule it consumed: one still named "dltensor" (a Triton that copied instead) is
# left to numpy's destructor, which frees the array.
_USED = b"used_dltensor"  # module-level: the capsule keeps a pointer to these bytes
_TRITON_USED = b"used_dlpack"
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_capsule_name.restype = ctypes.c_int
_capsule_is = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is.restype = ctypes.c_int


def to_numpy(tensor):
    """A copy of a pb_utils.Tensor's data (shape and dtype are right even where the data is misread,
    so an empty tensor, the prefill's past keys and values, is taken as it is)."""
    array = tensor.as_numpy()
    return array.copy() if array.size == 0 else np.array(np.from_dlpack(tensor))


def from_numpy(name, array):
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # DLPack (numpy's version of it) exports writeable arrays only
        array = array.copy()
    if array.size == 0:  # nothing to misread, and DLPack's strides of an empty array fail Triton's check
        return pb_utils.Tensor(name, array)
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    if _capsule_is(capsule, _TRITON_USED):  # consumed: the tensor owns the array's data now
        _set_capsule_name(capsule, _USED)
    return tensor
