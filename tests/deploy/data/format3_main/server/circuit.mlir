module {
  func.func @circuit_fn(%arg0: tensor<1x4x!FHE.eint<9>>) -> tensor<1x2x!FHE.eint<9>> {
    %cst = arith.constant dense<[[0, -3], [3, 2], [-7, 0], [-6, 7]]> : tensor<4x2xi5>
    %0 = "FHELinalg.to_signed"(%arg0) : (tensor<1x4x!FHE.eint<9>>) -> tensor<1x4x!FHE.esint<9>>
    %1 = "FHELinalg.matmul_eint_int"(%0, %cst) : (tensor<1x4x!FHE.esint<9>>, tensor<4x2xi5>) -> tensor<1x2x!FHE.esint<9>>
    %cst_0 = arith.constant dense<[[195, 45]]> : tensor<1x2xi9>
    %2 = "FHELinalg.to_unsigned"(%1) : (tensor<1x2x!FHE.esint<9>>) -> tensor<1x2x!FHE.eint<9>>
    %3 = "FHELinalg.add_eint_int"(%2, %cst_0) : (tensor<1x2x!FHE.eint<9>>, tensor<1x2xi9>) -> tensor<1x2x!FHE.eint<9>>
    return %3 : tensor<1x2x!FHE.eint<9>>
  }
}