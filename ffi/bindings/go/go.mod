module example.invalid/meshshm/ffi/bindings/go

go 1.21
