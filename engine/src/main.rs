//! The `iris` binary: see `engine::main`.

fn main() -> std::process::ExitCode {
    engine::main()
}
