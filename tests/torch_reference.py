"""Helpers for tests that compare against PyTorch references (pytorch-fid, torchvision,
transformers' models)."""


def perturbed(torch, model, scale=0.1):
  """Every parameter (norm scales and biases, layer scales, registers included) moved off its
  initial value, so that a mixed-up parameter shows; eval mode."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * scale)
  return model.eval()


def import_torchvision(torch):
  """torchvision 0.28 on this CPU torch fails to register its fake ops (`torchvision::nms does not
  exist`, ENV.md): import it once with torchvision:: registrations skipped (the models used as
  references need none of its ops)."""
  import importlib.util
  if importlib.util.find_spec("torchvision") is None:
    return
  original = torch.library.register_fake

  def register_fake(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith("torchvision::"):
      return args[0] if args else (lambda fn: fn)
    return original(op, *args, **kwargs)

  torch.library.register_fake = register_fake
  try:
    import torchvision  # noqa: F401
  finally:
    torch.library.register_fake = original


def pytorch_fid_module(torch, name: str = "inception"):
  """pytorch_fid.<name> with torchvision importable and the Inception weight download blocked
  (skips the test when pytorch-fid is not installed)."""
  import pytest
  import_torchvision(torch)
  module = pytest.importorskip(f"pytorch_fid.{name}")
  import pytorch_fid.inception as fid_inception

  def no_download(*args, **kwargs):
    raise RuntimeError("weight download blocked in tests")

  fid_inception.load_state_dict_from_url = no_download
  return module
