//! The `iris` binary, built inside the `tests` package so the end-to-end tests
//! can find it through `CARGO_BIN_EXE_iris-e2e`. Same code as `engine`'s `iris`.

fn main() -> std::process::ExitCode {
    engine::main()
}
