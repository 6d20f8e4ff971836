"""flashfx's own operators, registered with torch.library under the `flashfx` namespace.

Each op lives with its kernels in `flashfx/codegen/<op>.py` (kernels -> launchers -> autograd -> the custom op with
its fake implementation and ATen reference); importing this module registers them all, so `torch.ops.flashfx.*`
exists whenever flashfx is imported.
"""
from flashfx.codegen import attention as _attention  # noqa: F401
from flashfx.codegen import cross_entropy as _cross_entropy  # noqa: F401
