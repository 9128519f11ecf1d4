fn main() {
    sd_torch_link::emit()
}
