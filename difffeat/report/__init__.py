"""What people look at: the one-page report of a chain (`build`), the kinds of folder it shows (`kinds`, registered
by the packages that write them), the page kit (`page`) and its checks (`check`), the store's own section
(`store_section`), pictures of features (`viz`)."""
