"""What a rank inherits from its driver's environment."""

from rayxdit.runtime.executor import forwarded_env


def test_ranks_get_the_tokens_caches_nccl_and_allocator_settings_and_nothing_else():
    environ = {
        "HF_TOKEN": "hf_x",
        "NCCL_NVLS_ENABLE": "0",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "PYTORCH_ALLOC_CONF": "expandable_segments:True",
        "RAYXDIT_SOURCE_COMMIT": "abc",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "PATH": "/usr/bin",
    }
    assert set(forwarded_env(environ)) == set(environ) - {"AWS_SECRET_ACCESS_KEY", "PATH"}
