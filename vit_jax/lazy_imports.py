"""Modules that load on first use.

`import tensorflow` takes ~5 s here. Only reading data needs it, so the
input pipeline and the preprocessing ops hold a lazy TensorFlow: a mistake
in the config is reported before TensorFlow loads, and commands that never
read data (export, checkpoint inspection) do not load it at all.
"""

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
  """Stands for module `name`, which is imported when an attribute is read.

  Not registered in `sys.modules`: libraries that only ask whether a module
  is installed (`importlib.util.find_spec`, as etils does for TensorFlow)
  must not load it by asking.
  """

  def __getattr__(self, attribute: str) -> Any:
    # Only called for attributes the proxy itself lacks; after the first
    # call `import_module` is a lookup in sys.modules.
    return getattr(importlib.import_module(self.__name__), attribute)
