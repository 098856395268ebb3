import llama_cpp.llama_cpp as llama_cpp_api
import pytest

from verifier import weight_buffers
from verifier.weight_buffers import llama_weight_buffers, use_extra_buffers


@pytest.mark.parametrize("amx", [True, False])
def test_auto_keeps_weights_out_of_extra_buffers_where_the_build_uses_amx(monkeypatch, amx):
    monkeypatch.setattr(weight_buffers, "amx_in_build", lambda: amx)
    assert use_extra_buffers("auto") is (not amx) and use_extra_buffers() is (not amx)
    assert use_extra_buffers("on") is True and use_extra_buffers("off") is False
    with pytest.raises(ValueError, match="auto, on, off"):
        use_extra_buffers("maybe")


@pytest.mark.parametrize("setting", ["on", "off", "auto"])
def test_llama_cpp_python_models_built_inside_place_weights_as_the_target_does(setting):
    default = llama_cpp_api.llama_model_default_params
    with llama_weight_buffers(setting):
        assert llama_cpp_api.llama_model_default_params().use_extra_bufts == \
            use_extra_buffers(setting)
    assert llama_cpp_api.llama_model_default_params is default
    with pytest.raises(RuntimeError), llama_weight_buffers("off"):
        raise RuntimeError("loading failed")
    assert llama_cpp_api.llama_model_default_params is default
    assert default().use_extra_bufts  # llama.cpp's own default is untouched
