//! The `ztunnel` binary: everything is in the library (see [`ambit_ztunnel`]), so fuzz
//! targets and tests reach the same code.

fn main() -> anyhow::Result<()> {
    ambit_ztunnel::main()
}
