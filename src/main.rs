fn main() {
    println!("eap");
}
