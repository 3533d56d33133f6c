"""Stand-ins for SGLang 0.5.23's host KV pools: the same ``kv_buffer`` shapes (from
``MHATokenToKVPoolHost.init_kv_buffer`` / ``MLATokenToKVPoolHost.init_kv_buffer``) and
the same flat-page accessors (``get_data_page``), written out here because the real
classes' module imports SGLang's model configs, which need torchvision (no CPU build
of it matches torch 2.13 here)."""

import torch


class FakeHostPool:
    def __init__(self, layout, *, is_mla=False, layer_num=3, head_num=2, head_dim=4,
                 page_size=4, page_num=6, dtype=torch.float32):
        self.layout, self.layer_num, self.page_size, self.dtype = layout, layer_num, page_size, dtype
        self.page_num, self.size = page_num, page_num * page_size
        L, N, P, S = layer_num, page_num, page_size, self.size
        if is_mla:
            self.kv_cache_dim = head_dim
            D = head_dim
            dims = {"layer_first": (L, S, 1, D), "page_first": (S, L, 1, D),
                    "page_first_direct": (N, L, P, 1, D)}[layout]
        else:
            self.head_num, self.head_dim, self.v_head_dim = head_num, head_dim, head_dim
            H, D = head_num, head_dim
            dims = {"layer_first": (2, L, S, H, D), "page_first": (2, S, L, H, D),
                    "page_first_direct": (2, N, L, P, H, D),
                    "page_head": (2, N, H, P, L, D)}[layout]
        self.is_mla = is_mla
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def get_data_page(self, index, flat=True):
        """SGLang's accessor, copied (MHA and MLA): page starting at token row ``index``."""
        P = self.page_size
        if self.is_mla:
            if self.layout == "layer_first":
                page = self.kv_buffer[:, index : index + P, :, :]
            elif self.layout == "page_first":
                page = self.kv_buffer[index : index + P, :, :, :]
            else:
                page = self.kv_buffer[index // P : index // P + 1]
        elif self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + P, :, :]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + P, :, :, :]
        else:
            page = self.kv_buffer[:, index // P : index // P + 1, :, :, :, :]
        return page.flatten() if flat else page

    def flat_in_sglang_order(self, index):
        """The page as SGLang's flat dummy page orders it: MHA [2][L][P][H][D], MLA [L][P][1][D]."""
        page = self.get_data_page(index, flat=False)
        if self.is_mla:
            if self.layout == "page_first":
                page = page.permute(1, 0, 2, 3)
            elif self.layout == "page_first_direct":
                page = page[0]
            return page.reshape(-1)
        if self.layout == "page_first":
            page = page.permute(0, 2, 1, 3, 4)
        elif self.layout == "page_first_direct":
            page = page[:, 0]
        elif self.layout == "page_head":
            page = page[:, 0].permute(0, 3, 2, 1, 4)
        return page.reshape(-1)

    def fill_random(self, seed):
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=torch.Generator().manual_seed(seed)))
