import PayopIPND

/// Thin on purpose: everything lives in the PayopIPND library, where tests reach it.
@main
struct Entry {
    static func main() async {
        await PayopIPNDCommand.main()
    }
}
